//! `cache-money-server`: parses configuration, sets up logging, binds the listener and hands
//! over to [`cache_money::server::run`] until SIGTERM or Ctrl-C.

use anyhow::Context;
use cache_money::server::{self, config::Config};
use clap::Parser;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    server::init_logging(config.log_format);
    config.validate().map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    server::run(config, listener, server::shutdown::signal()).await?;
    Ok(())
}
