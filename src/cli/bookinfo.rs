//! `keycard bookinfo`: the Bookinfo apps for the compose mesh, and a one-request HTTP client for
//! checking flows from inside a container (the image has no curl).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use tokio::net::TcpListener;

use crate::bookinfo::{self, App, Calls};

#[derive(Debug, Subcommand)]
pub enum BookinfoCommand {
    /// Serve one Bookinfo app (JSON over HTTP/1.1 and h2c).
    Serve {
        app: App,
        #[arg(long, default_value = "0.0.0.0:9080")]
        listen: std::net::SocketAddr,
        /// Base URL of details (productpage calls it), e.g. http://details:9080.
        #[arg(long)]
        details: Option<String>,
        /// Base URL of reviews (productpage calls it).
        #[arg(long)]
        reviews: Option<String>,
        /// Base URL of ratings (reviews calls it).
        #[arg(long)]
        ratings: Option<String>,
    },
    /// One request; prints the status and the body. Exit 0 with an answer (and, with --expect, the
    /// expected status), 1 with another status, 2 with no answer at all.
    Get {
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name: value`, repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long)]
        expect: Option<u16>,
    },
}

pub fn run(cmd: BookinfoCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        match cmd {
            BookinfoCommand::Serve { app, listen, details, reviews, ratings } => {
                let listener =
                    TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!(app = app.name(), %listen, "bookinfo app listening");
                let stop = tokio_util::sync::CancellationToken::new();
                let serving = tokio::spawn(bookinfo::serve(
                    app,
                    listener,
                    Calls { details, reviews, ratings },
                    stop.clone(),
                ));
                super::ca::shutdown_signal().await;
                stop.cancel();
                let _ = serving.await;
                Ok(ExitCode::SUCCESS)
            }
            BookinfoCommand::Get { url, method, headers, expect } => {
                let method = http::Method::from_bytes(method.as_bytes()).context("bad --method")?;
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(k, v)| (k.trim(), v.trim()))
                            .context("a header is `name: value`")
                    })
                    .collect::<anyhow::Result<_>>()?;
                match bookinfo::send(&bookinfo::client(), method, &url, &headers).await {
                    Ok((status, body)) => {
                        println!("{}", status.as_u16());
                        println!("{}", String::from_utf8_lossy(&body));
                        Ok(if expect.is_none_or(|e| e == status.as_u16()) {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(1)
                        })
                    }
                    Err(e) => {
                        println!("no answer: {e}");
                        Ok(ExitCode::from(2))
                    }
                }
            }
        }
    })
}
