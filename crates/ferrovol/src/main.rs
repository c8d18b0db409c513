//! `ferrovol`: the driver and its tools in one binary. This crate only puts
//! the others together: the command line, and which engine `serve` opens.

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use cli::{Cli, Command, EngineKind, LinkArgs, LinkCommand, PoolCommand, ServeCommand};
use ferrovol_block::BlockStaging;
use ferrovol_core::cli::Mode;
use ferrovol_core::engine::NodeEngine;
use ferrovol_core::server::Companion;
use ferrovol_core::server::Halves;
use ferrovol_local::node::LocalNode;
use ferrovol_local::LocalEngine;

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
    ferrovol_csi::build::set_version(env!("FERROVOL_VERSION"), env!("FERROVOL_GIT_REV"));
    let cli = Cli::parse();
    ferrovol_core::logging::init(cli.log_format);
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
                ferrovol_tools::ctl::run(args).await.map_err(|e| (e.render(output), e.code))
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
        Command::Serve(args) => serve(*args).await,
        Command::Bench(args) if args.engine == ferrovol_tools::bench::BenchEngine::Rbd => {
            ferrovol_rbd::bench::run(&args).await
        }
        Command::Bench(args) if args.engine == ferrovol_tools::bench::BenchEngine::Cephfs => {
            ferrovol_cephfs::bench::run(&args).await
        }
        Command::Bench(args) => ferrovol_tools::bench::run(args).await,
        Command::Probe(args) => ferrovol_tools::prober::run(args).await,
        Command::Demo(args) if args.engine == ferrovol_tools::demo::DemoEngine::Cephfs => {
            let conf = args.ceph_conf.ok_or(
                "--engine cephfs needs --ceph-conf (e.g. from scripts/ceph-dev-cluster start DIR \
                 --cephfs)",
            )?;
            ferrovol_cephfs::demo::run(&conf, &args.cephfs_fs).await
        }
        Command::Demo(args) => ferrovol_tools::demo::run(args).await,
        Command::Ctl(_) => Err("ctl is dispatched by main".into()),
        Command::Link(LinkCommand::Certs { out, nodes, days, force }) => {
            ferrovol_relay::certs::make(&out, &nodes, days, force)
        }
        Command::Link(LinkCommand::Secret { dir, namespace }) => {
            print!("{}", ferrovol_relay::certs::relay_secret_from(&dir, &namespace)?);
            Ok(())
        }
        Command::Pool(PoolCommand::Check { state_dir, pool_dir, repair }) => {
            let pool_dir = pool_dir.unwrap_or_else(|| state_dir.join("pool"));
            let report = LocalEngine::check_pool(&pool_dir, repair)
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
        Command::Pool(PoolCommand::Seed { dir, volumes, node_id, legacy_ids }) => {
            ferrovol_local::seed::thin_volumes(&dir, volumes, 1 << 30, &node_id, legacy_ids)
                .await
                .map_err(|e| e.message().to_string())
        }
        Command::Pool(PoolCommand::Release { dir }) => {
            let image =
                ferrovol_local::poolinit::teardown(&dir).map_err(|e| e.message().to_string())?;
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
            use ferrovol_local::poolinit::Outcome;
            let image = image.unwrap_or_else(|| dir.with_extension("img"));
            let (pool, outcome, warning) =
                ferrovol_local::poolinit::ensure(&dir, &image, size, fs, preallocate)
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

/// A configured path made absolute against the working directory at start:
/// helpers that change directory (rbd-fuse) and messages then agree on it.
fn absolute(path: &mut std::path::PathBuf) -> Result<(), String> {
    *path = std::path::absolute(&*path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Opens the engine `--engine` names, as the halves `--mode` asks for (a
/// node-only process never opens what only the controller half needs, the
/// local engine's journal; a relay opens no pool at all), and serves it.
async fn serve(mut args: ServeCommand) -> Result<(), String> {
    for p in [
        Some(&mut args.common.state_dir),
        Some(&mut args.common.kubelet_dir),
        args.pool_dir.as_mut(),
        args.link.link_tls.as_mut(),
        args.rbd.ceph_conf.as_mut(),
        args.rbd.ceph_keyring.as_mut(),
        args.rbd.ceph_secret_dir.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        absolute(p)?;
    }
    let mut common = args.common;
    if common.driver_name == ferrovol_core::cli::DEFAULT_DRIVER_NAME {
        match args.engine {
            EngineKind::Local => {}
            EngineKind::Rbd => common.driver_name = ferrovol_rbd::DRIVER_NAME.to_string(),
            EngineKind::Cephfs => common.driver_name = ferrovol_cephfs::DRIVER_NAME.to_string(),
        }
    }
    let node_id = ferrovol_core::server::node_id(&common)?;
    let link = args.link;
    if common.mode == Mode::Relay {
        let (halves, companion) = relay(&link).await?;
        return ferrovol_core::server::run(common, node_id, halves, Some(companion)).await;
    }
    // The agent's link acts on its local engine directly (a group part
    // under the relay's freeze).
    let mut local_engine = None;
    let halves: Halves = match args.engine {
        EngineKind::Local => {
            // The pool's identity record lives in the state dir.
            ferrovol_core::server::prepare_state_dir(&common)?;
            let pool_dir = args.pool_dir.unwrap_or_else(|| common.state_dir.join("pool"));
            let failed = |e: ferrovol_error::Error| {
                format!("opening pool {}: {}", pool_dir.display(), e.message())
            };
            if !common.mode.controller() {
                let node =
                    LocalNode::open(&pool_dir, &common.state_dir, &node_id).map_err(failed)?;
                (None, Some(Arc::new(BlockStaging::new(Arc::new(node), &common.state_dir))))
            } else {
                let engine = LocalEngine::open(&pool_dir, &common.state_dir, &node_id)
                    .await
                    .map_err(failed)?;
                let engine = Arc::new(engine);
                local_engine = Some(engine.clone());
                let node: Option<Arc<dyn NodeEngine>> = match common.mode.node() {
                    true => Some(Arc::new(BlockStaging::new(engine.clone(), &common.state_dir))),
                    false => None,
                };
                (Some(engine), node)
            }
        }
        EngineKind::Rbd => rbd(&common, &args.rbd).await?,
        EngineKind::Cephfs => cephfs(&common, &args.rbd).await?,
    };
    let companion = match (common.mode, local_engine) {
        (Mode::Agent, Some(engine)) => Some(agent(&link, engine)?),
        (Mode::Agent, None) => return Err("--mode agent serves the local engine".into()),
        _ => None,
    };
    ferrovol_core::server::run(common, node_id, halves, companion).await
}

/// `--engine rbd`: the controller half talks to the cluster; the node
/// half maps images. Ceph's libraries are loaded here, and only here.
async fn rbd(
    common: &ferrovol_core::cli::ServeArgs,
    args: &cli::RbdArgs,
) -> Result<Halves, String> {
    use ferrovol_rbd::{controller, node};
    let conn = ceph_connections(common, args, "RBD")?;
    for pool in &args.rbd_pools {
        ferrovol_rbd::ids::check_pool(pool).map_err(|e| format!("--rbd-pools: {}", e.message()))?;
    }
    let controller: Option<Arc<dyn ferrovol_core::engine::ControllerEngine>> =
        match common.mode.controller() {
            true => {
                let settings = controller::Settings {
                    pools: args.rbd_pools.clone(),
                    max_clone_depth: args.rbd_max_clone_depth,
                    max_volumes_per_node: common.max_volumes_per_node,
                };
                Some(Arc::new(controller::RbdEngine::open(conn.clone(), settings).await))
            }
            false => None,
        };
    let node: Option<Arc<dyn NodeEngine>> = match common.mode.node() {
        true => {
            ferrovol_core::server::prepare_state_dir(common)?;
            let node = node::RbdNode::new(conn, common.state_dir.clone(), args.rbd_mapper)
                .map_err(|e| e.message().to_string())?;
            Some(Arc::new(BlockStaging::new(Arc::new(node), &common.state_dir)))
        }
        false => None,
    };
    Ok((controller, node))
}

/// The Ceph engines' connections: the driver's own client from the flags
/// (or the mounted secret), others per request. The relay and its agents
/// are the local engine's: a Ceph engine's controller reaches the cluster
/// itself.
fn ceph_connections(
    common: &ferrovol_core::cli::ServeArgs,
    args: &cli::RbdArgs,
    engine: &str,
) -> Result<ferrovol_cephclient::connect::Connections, String> {
    use ferrovol_cephclient::connect;
    if matches!(common.mode, Mode::Relay | Mode::Agent) {
        return Err(format!(
            "the relay and its agents are the local engine's; the {engine} engine's controller \
             reaches the cluster itself (--mode controller)"
        ));
    }
    let mut config = connect::ClusterConfig {
        conf: args.ceph_conf.clone(),
        user: args.ceph_user.clone(),
        keyring: args.ceph_keyring.clone(),
        key: None,
        op_timeout: args.ceph_timeout,
    };
    if let Some(dir) = &args.ceph_secret_dir {
        config
            .use_secret_dir(dir, common.mode.controller())
            .map_err(|e| format!("--ceph-secret-dir: {}", e.message()))?;
    }
    let conn = connect::Connections::new(config).map_err(|e| e.message().to_string())?;
    if let Some(dir) = &args.helper_cgroup {
        if !common.mode.node() {
            return Err("--helper-cgroup is for the node half (--mode node or all)".into());
        }
        ferrovol_cephclient::helper::run_in_cgroup(dir)
            .map_err(|e| format!("--helper-cgroup: {}", e.message()))?;
        if std::process::id() == 1 {
            // The first process of a PID namespace: the kernel kills every
            // process of the namespace when it exits, whatever their cgroup.
            tracing::warn!(
                "this driver is PID 1 of its PID namespace: its helpers still end with it \
                 (run the node pod with hostPID: true)"
            );
        }
    }
    Ok(conn)
}

/// `--engine cephfs`: the controller half makes subvolumes through the
/// cluster's manager; the node half mounts them with ceph-fuse.
async fn cephfs(
    common: &ferrovol_core::cli::ServeArgs,
    args: &cli::RbdArgs,
) -> Result<Halves, String> {
    use ferrovol_cephfs::{controller, node};
    let conn = ceph_connections(common, args, "CephFS")?;
    for fs in &args.cephfs_filesystems {
        ferrovol_cephfs::ids::check_id_part("--cephfs-filesystems", fs)
            .map_err(|e| e.message().to_string())?;
    }
    let controller: Option<Arc<dyn ferrovol_core::engine::ControllerEngine>> =
        match common.mode.controller() {
            true => {
                let settings = controller::Settings {
                    filesystems: args.cephfs_filesystems.clone(),
                    restore_wait: args.cephfs_restore_wait,
                    copier: args.cephfs_copier.into(),
                    abandon_after: args.cephfs_copy_abandon_after,
                };
                let engine = controller::CephFsEngine::open(conn.clone(), settings)
                    .map_err(|e| e.message().to_string())?;
                let engine = Arc::new(engine);
                // Copies nobody asks about any more (left by a previous
                // run or another replica) are removed, now and then.
                let sweeper = engine.clone();
                let every = (args.cephfs_copy_abandon_after / 2)
                    .clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(300));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        if let Err(e) = sweeper.sweep_copies().await {
                            tracing::warn!("sweeping abandoned copies: {}", e.message());
                        }
                    }
                });
                Some(engine)
            }
            false => None,
        };
    let node: Option<Arc<dyn NodeEngine>> = match common.mode.node() {
        true => {
            ferrovol_core::server::prepare_state_dir(common)?;
            Some(Arc::new(node::CephFsNode::new(&common.state_dir, conn)))
        }
        false => None,
    };
    Ok((controller, node))
}

fn link_tls(link: &LinkArgs) -> Result<ferrovol_relay::tls::Credentials, String> {
    let dir = link.link_tls.as_ref().ok_or("--link-tls is required for the relay link")?;
    ferrovol_relay::tls::Credentials::load(dir)
}

/// `--mode relay`: the engine that asks the agents, and the listener they
/// dial (bound before the driver says it is serving).
async fn relay(link: &LinkArgs) -> Result<(Halves, Companion), String> {
    use ferrovol_relay::relay::{agents, engine::RelayEngine};
    let addr = link.link_listen.as_ref().ok_or("--mode relay needs --link-listen")?;
    let tls = link_tls(link)?.server()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the link listener {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(addr = %local, "link listening for node agents");
    let registry = Arc::new(agents::Agents::retiring(&link.retired_nodes));
    let engine = Arc::new(RelayEngine::new(registry.clone(), link.group_freeze_limit));
    let companion: Companion =
        Box::new(move |_| tokio::spawn(agents::listen(listener, tls, registry)));
    Ok(((Some(engine), None), companion))
}

/// `--mode agent`: dial the relay and serve it this node's controller
/// services.
fn agent(link: &LinkArgs, engine: Arc<LocalEngine>) -> Result<Companion, String> {
    let addr = link.link_controller.clone().ok_or("--mode agent needs --link-controller")?;
    let tls = link_tls(link)?.client()?;
    Ok(Box::new(move |driver| tokio::spawn(ferrovol_relay::agent::run(addr, tls, driver, engine))))
}
