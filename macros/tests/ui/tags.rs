use cache_money_macros::memoize;

#[memoize(tags = ["user:{user}"])]
async fn unknown_argument(id: u64) -> u64 {
    id
}

#[memoize(tags = ["user:{}"])]
async fn positional(id: u64) -> u64 {
    id
}

#[memoize(tags = ["user:{id"])]
async fn unclosed(id: u64) -> u64 {
    id
}

#[memoize(tags = "user:{id}")]
async fn not_an_array(id: u64) -> u64 {
    id
}

#[memoize(tags = [""])]
async fn empty(id: u64) -> u64 {
    id
}

fn main() {}
