//! `cache-money-server`: parses configuration, sets up logging, binds the listener and hands
//! over to [`cache_money::server::run`] until SIGTERM or Ctrl-C.

use anyhow::Context;
use cache_money::server::{self, config::Config};
use clap::Parser;
use tokio::net::TcpListener;

/// mimalloc rather than glibc's malloc: see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    server::init_logging(config.log_format);
    config.validate().map_err(anyhow::Error::msg)?;
    // One thread by default: at a few microseconds of work per request, letting responses
    // queue up and share a write beats spreading them over cores (BENCHMARKS.md).
    let runtime = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    server::run(config, listener, server::shutdown::signal()).await?;
    Ok(())
}
