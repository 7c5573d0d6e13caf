//! `outbox serve`: the operator dashboard ([`outbox_dashboard`]) over the
//! tables named by the global options, until interrupted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use outbox_core::OutboxBroker;
use outbox_dashboard::Dashboard;

use crate::output::Failure;

/// The options of `outbox serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    /// Listening beyond loopback without --basic-auth or --bearer-token
    /// logs a warning.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Allow the write actions (replay and purge of dead letters); without
    /// it the dashboard is read-only and refuses every POST.
    #[arg(long)]
    allow_writes: bool,
    /// Require HTTP basic authentication with these credentials (prefer the
    /// environment variable: a command line is visible to other users).
    #[arg(
        long,
        value_name = "USER:PASS",
        env = "OUTBOX_DASHBOARD_BASIC_AUTH",
        hide_env_values = true
    )]
    basic_auth: Option<String>,
    /// Require `Authorization: Bearer TOKEN` (with --basic-auth, either is
    /// accepted; prefer the environment variable).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "OUTBOX_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    bearer_token: Option<String>,
}

impl ServeArgs {
    /// The dashboard these options describe.
    fn dashboard(&self, broker: OutboxBroker) -> Result<Dashboard, Failure> {
        let mut d = Dashboard::new(broker).allow_writes(self.allow_writes);
        if let Some(creds) = &self.basic_auth {
            let Some((user, pass)) = creds
                .split_once(':')
                .filter(|(u, p)| !u.is_empty() && !p.is_empty())
            else {
                return Err(Failure::usage(
                    "--basic-auth (or OUTBOX_DASHBOARD_BASIC_AUTH) must be USER:PASS, both \
                     non-empty",
                ));
            };
            d = d.basic_auth(user, pass);
        }
        if let Some(token) = &self.bearer_token {
            if token.is_empty() {
                return Err(Failure::usage(
                    "--bearer-token (or OUTBOX_DASHBOARD_TOKEN) must not be empty",
                ));
            }
            d = d.bearer_token(token.clone());
        }
        Ok(d)
    }
}

/// Serves until Ctrl-C or SIGTERM; prints the address once listening.
pub(crate) async fn run(broker: OutboxBroker, args: &ServeArgs) -> Result<ExitCode, Failure> {
    let dashboard = args.dashboard(broker)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| {
            Failure::runtime(
                outbox_dashboard::Error::Bind {
                    addr: args.listen,
                    source,
                }
                .to_string(),
            )
        })?;
    let addr = listener.local_addr().map_err(Failure::io)?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "outbox dashboard on http://{addr}/ ({}); Ctrl-C to stop",
            if args.allow_writes {
                "writes allowed"
            } else {
                "read-only"
            }
        );
        let _ = out.flush();
    }
    dashboard
        .serve_listener(listener, crate::stop_signal())
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}
