# Builds cache-money-server; see docker-compose.yml for running it beside Redis.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cache-money-server

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 cache-money
COPY --from=build /src/target/release/cache-money-server /usr/local/bin/cache-money-server
USER cache-money
EXPOSE 50051
# In a container the server must listen on all interfaces; publish the port with care.
ENV CACHE_MONEY_LISTEN=0.0.0.0:50051
ENTRYPOINT ["cache-money-server"]
