use cache_money_macros::memoize;

#[memoize(timeout = 60)]
async fn unknown_option(a: i64) -> i64 {
    a
}

#[memoize(ttl = 60, ttl = 120)]
async fn twice(a: i64) -> i64 {
    a
}

#[memoize(version = 0)]
async fn version_zero(a: i64) -> i64 {
    a
}

#[memoize(skip(db))]
async fn skip_unknown(a: i64) -> i64 {
    a
}

#[memoize(key = (a,), skip(b))]
async fn key_and_skip(a: i64, b: i64) -> i64 {
    a + b
}

#[memoize(ns = "billing::invoices v2")]
async fn bad_namespace(a: i64) -> i64 {
    a
}

#[memoize]
async fn café(a: i64) -> i64 {
    a
}

#[memoize(cache_none = "yes")]
async fn cache_none_string(a: i64) -> i64 {
    a
}

fn main() {}
