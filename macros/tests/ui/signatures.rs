use cache_money_macros::memoize;

#[memoize]
fn not_async(a: i64) -> i64 {
    a
}

#[memoize]
async fn generic<T: Copy>(a: T) -> T {
    a
}

#[memoize]
async fn impl_argument(a: impl std::fmt::Display) -> String {
    a.to_string()
}

#[memoize]
async fn impl_result(a: i64) -> impl std::fmt::Display {
    a
}

#[memoize]
async fn pattern((a, b): (i64, i64)) -> i64 {
    a + b
}

#[memoize]
async fn no_result(a: i64) {
    let _ = a;
}

struct Service;

impl Service {
    #[memoize]
    async fn by_value(self, a: i64) -> i64 {
        a
    }
}

impl Service {
    #[memoize]
    async fn associated(a: i64) -> Self {
        let _ = a;
        Service
    }
}

#[memoize]
struct NotAFunction;

fn main() {}
