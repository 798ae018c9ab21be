# Builds cache-money-server and the cache-money CLI; see docker-compose.yml for running them
# beside Redis.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt when the manifest, the lock file,
# the build script or the contract change, not on every source edit. The crate's sources are
# placeholders in this layer; benches/ comes along because Cargo.toml names its targets, and
# macros/ (the #[memoize] crate, a workspace member the library depends on) in full: it
# changes rarely.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
COPY macros macros
RUN mkdir cli client server \
    && touch client/lib.rs \
    && echo 'fn main() {}' > server/main.rs \
    && echo 'fn main() {}' > cli/main.rs \
    && cargo build --release --locked --bins
COPY cli cli
COPY client client
COPY server server
# COPY keeps the sources' modification times, which can be older than the placeholder build:
# touching the crate roots makes cargo rebuild the crate rather than keep the placeholder.
RUN touch cli/main.rs client/lib.rs server/main.rs \
    && cargo build --release --locked --bins

FROM debian:bookworm-slim
# The system trust store, so a rediss:// Redis is verified in a container as on a host.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 cache-money
COPY --from=build /src/target/release/cache-money-server /usr/local/bin/cache-money-server
# The operators' CLI: `cache-money health` is the compose healthcheck, and `docker compose
# exec cache-money cache-money stats` works without installing anything.
COPY --from=build /src/target/release/cache-money /usr/local/bin/cache-money
USER cache-money
EXPOSE 50051
# In a container the server must listen on all interfaces; publish the port with care.
ENV CACHE_MONEY_LISTEN=0.0.0.0:50051
ENTRYPOINT ["cache-money-server"]
