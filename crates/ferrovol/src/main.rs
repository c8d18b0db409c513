use std::process::ExitCode;

use clap::Parser;
use ferrovol::cli::{Cli, Command, PoolCommand};

/// Twice the cores, at least four. Handlers make short syscalls inline
/// (mount table, sysfs, journal reads from the page cache) because handing
/// each to the blocking pool costs more than it does; under load those
/// moments add up, and with one worker per core Probe queued behind them
/// (soak, 2 cores: no-op RPC p99 12.4 ms with 2 workers, 6.0 ms with 4).
fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).max(4)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferrovol::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Each failure is said once. The daemons (serve, probe) say it in their
    // log, which is where their operators look (and JSON when the log is);
    // the tools say it on stderr: ctl as text or, with -o json, as JSON,
    // with an exit code per failure class. Every other failure exits 1.
    let daemon = matches!(cli.command, Command::Serve(_) | Command::Probe(_));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Ctl(args) => {
                let output = args.output;
                ferrovol::ctl::run(args).await.map_err(|e| (e.render(output), e.code))
            }
            other => run(other).await.map_err(|e| (format!("ferrovol: {e}"), 1)),
        }
    });
    // Nothing the commands left running (a blocking call past its timeout)
    // may keep the process alive once they are done.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            if daemon {
                tracing::error!(error = %message.trim_start_matches("ferrovol: "), "ferrovol failed");
            } else {
                use std::io::Write;
                // Nothing more can be said if stderr is gone too.
                let _ = writeln!(std::io::stderr(), "{message}");
            }
            ExitCode::from(code)
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve(args) => ferrovol::server::run(args).await,
        Command::Bench(args) => ferrovol::bench::run(args).await,
        Command::Probe(args) => ferrovol::prober::run(args).await,
        Command::Demo(args) => ferrovol::demo::run(args).await,
        Command::Ctl(_) => Err("ctl is dispatched by main".into()),
        Command::Pool(PoolCommand::Check { state_dir, pool_dir, repair }) => {
            let pool_dir = pool_dir.unwrap_or_else(|| state_dir.join("pool"));
            let report = ferrovol::engine::local::LocalEngine::check_pool(&pool_dir, repair)
                .await
                .map_err(|e| e.message().to_string())?;
            let verb = if repair { "repaired" } else { "would repair" };
            if report.is_clean() {
                println!("pool {} is clean", pool_dir.display());
                return Ok(());
            }
            println!("pool {}: {verb}: {report}", pool_dir.display());
            if report.needs_a_person() {
                return Err(
                    "dangling records or orphaned files need a person (see docs/architecture.md)"
                        .into(),
                );
            }
            if !repair {
                return Err("the pool needs repair (run with --repair, or start the driver)".into());
            }
            Ok(())
        }
        Command::Pool(PoolCommand::Release { dir }) => {
            let image = ferrovol::poolinit::teardown(&dir).map_err(|e| e.message().to_string())?;
            println!(
                "pool at {} released: unmounted, loop device detached; the image {} and its \
                 data remain (delete it to free the space, and its /etc/fstab line; or run \
                 pool init with the same arguments to mount it again)",
                dir.display(),
                image.display()
            );
            Ok(())
        }
        Command::Pool(PoolCommand::Init { dir, size, fs, image, preallocate }) => {
            use ferrovol::poolinit::Outcome;
            let image = image.unwrap_or_else(|| dir.with_extension("img"));
            let (pool, outcome, warning) =
                ferrovol::poolinit::ensure(&dir, &image, size, fs, preallocate)
                    .await
                    .map_err(|e| e.message().to_string())?;
            if let Some(w) = warning {
                eprintln!("ferrovol: warning: {w}");
            }
            let what = match outcome {
                Outcome::Created => "pool ready",
                Outcome::AlreadyMounted => "pool already set up, nothing to do",
                Outcome::Remounted => "pool image found and mounted again",
            };
            println!(
                "{what}: {} ({}) mounted on {} from {}\n\
                 to mount it at boot, add to /etc/fstab:\n  {} {} {} loop 0 0",
                pool.image.display(),
                fs.name(),
                pool.mountpoint.display(),
                pool.device.display(),
                pool.image.display(),
                pool.mountpoint.display(),
                fs.name()
            );
            Ok(())
        }
    }
}
