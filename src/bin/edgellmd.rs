//! edgellmd: the daemon. Reads the config, loads ONNX Runtime, serves org.edgellm.Daemon1,
//! preloads models, tells systemd it is ready, and shuts down cleanly on SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};

use edgellm::config::{Bus, Config, DEFAULT_PATH};
use edgellm::runtime::Runtime;
use edgellm::scheduler::Scheduler;
use edgellm::service::{AdminPolicy, Daemon, BUS_NAME, OBJECT_PATH};

#[derive(Parser, Debug)]
#[command(name = "edgellmd", version, about = "On-device LLM service over D-Bus")]
struct Args {
    /// The TOML config file.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Only check the config file and exit (0 when valid).
    #[arg(long)]
    check_config: bool,
}

fn init_logging() {
    // Under systemd, log to the journal through systemd-journal-logger: tracing events reach it
    // through tracing's `log` bridge (no tracing subscriber is installed then). Elsewhere, stderr.
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            if logger.with_syslog_identifier("edgellmd".into()).install().is_ok() {
                let level = std::env::var("EDGELLM_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Info);
                log::set_max_level(level);
                return;
            }
        }
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("EDGELLM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn notify(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
}

/// The gid of a group named in the config, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    edgellm::service::account_id("/etc/group", name)
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgellmd: invalid config: {e}");
            tracing::error!("invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}: ok ({} models)", config.file.display(), config.models.len());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgellmd: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("edgellmd: {message}");
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    let runtime = Runtime::load(config.runtime_library.as_deref()).map_err(|e| e.to_string())?;
    let scheduler = Scheduler::start(runtime, &config);
    let admin = AdminPolicy { daemon_uid: effective_uid(), admin_gid: config.daemon.admin_group.as_deref().and_then(group_id) };
    if let (Some(name), None) = (&config.daemon.admin_group, admin.admin_gid) {
        tracing::warn!(group = %name, "daemon.admin_group names no group in /etc/group");
    }
    let daemon = Daemon::new(scheduler.clone(), admin, config.daemon.log_text, config.daemon.token_interval);
    let conn = serve_on_bus(&config.daemon.bus, daemon).await?;
    tracing::info!(bus = ?config.daemon.bus, name = BUS_NAME, "serving");
    cancel_requests_of_departed_clients(&conn).await?;
    tokio::spawn(edgellm::service::relay_model_states(scheduler.subscribe_states(), conn.clone()));

    // Before preloading, which may take long: a SIGTERM or SIGHUP meanwhile waits for the loop
    // below instead of killing the process with requests running (the signals' default action).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(|e| e.to_string())?;
    scheduler.preload().await;
    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("ready");

    if let Some(why) = serve_until_stopped(&conn, &scheduler, config.clone(), &mut term, &mut hup).await {
        // Nobody can reach the daemon or hear its answers: stop at once and fail, so that the
        // service manager restarts it (Restart=on-failure) and it takes its name again.
        notify(&[sd_notify::NotifyState::Stopping]);
        let stopper = scheduler.clone();
        let _ = tokio::task::spawn_blocking(move || stopper.shutdown()).await;
        return Err(format!("lost the D-Bus bus: {why}; exiting so that the service manager restarts edgellmd"));
    }
    shut_down(&conn, &scheduler, config.daemon.shutdown_grace).await;
    Ok(())
}

/// Connects to `bus`, serves `daemon` at its object path and takes the well-known name.
async fn serve_on_bus(bus: &Bus, daemon: Daemon) -> Result<zbus::Connection, String> {
    let builder = match bus {
        Bus::Session => zbus::connection::Builder::session(),
        Bus::System => zbus::connection::Builder::system(),
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
    }
    .map_err(|e| format!("cannot connect to the D-Bus bus: {e}"))?;
    // Serve the object before taking the name, so no caller finds the name without the object.
    let connecting = builder.serve_at(OBJECT_PATH, daemon).map_err(|e| e.to_string())?.build();
    // A bus that accepts the socket but never answers would otherwise hang the start silently.
    let conn = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .map_err(|_| format!("the D-Bus bus ({bus:?}) did not answer within 30 s"))?
        .map_err(|e| format!("cannot connect to the D-Bus bus ({bus:?}): {e}"))?;
    match conn.request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into()).await {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => Ok(conn),
        Ok(_) | Err(zbus::Error::NameTaken) => {
            Err(format!("another process already owns {BUS_NAME} on this bus: is edgellmd already running?"))
        }
        Err(e) => Err(format!("cannot own {BUS_NAME}: {e} (on the system bus the D-Bus policy must allow this user)")),
    }
}

/// A client that leaves the bus has its requests cancelled: watches the bus's NameOwnerChanged.
async fn cancel_requests_of_departed_clients(conn: &zbus::Connection) -> Result<(), String> {
    let iface = conn.object_server().interface::<_, Daemon>(OBJECT_PATH).await.map_err(|e| e.to_string())?;
    let dbus = DBusProxy::new(conn).await.map_err(|e| e.to_string())?;
    let mut owners = dbus.receive_name_owner_changed().await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Some(signal) = owners.next().await {
            if let Ok(args) = signal.args() {
                if args.name().starts_with(':') && args.new_owner().is_none() {
                    iface.get().await.client_gone(args.name());
                }
            }
        }
    });
    Ok(())
}

/// The daemon's life once ready: reloads on SIGHUP, pings the watchdog, trims the heap, until
/// SIGTERM or Ctrl-C (`None`) or until it is off the bus (`Some(why)`).
async fn serve_until_stopped(
    conn: &zbus::Connection,
    scheduler: &Scheduler,
    mut current: Config,
    term: &mut tokio::signal::unix::Signal,
    hup: &mut tokio::signal::unix::Signal,
) -> Option<String> {
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut tick = tokio::time::interval(Duration::from_micros(if watchdog { watchdog_usec / 2 } else { 3_600_000_000 }));
    let bus_lost = watch_bus(conn);
    tokio::pin!(bus_lost);
    // Freed heap back to the system now and then: under a steady load glibc's arenas grow with
    // the requests while the bytes in use stay flat (heap fragments, not objects).
    let mut trim = tokio::time::interval(HEAP_TRIM_INTERVAL);
    loop {
        tokio::select! {
            _ = trim.tick() => {
                tokio::task::spawn_blocking(edgellm::scheduler::trim_heap);
            }
            _ = term.recv() => return None,
            why = &mut bus_lost => return Some(why),
            _ = hup.recv() => reload(&mut current, scheduler),
            _ = tokio::signal::ctrl_c() => return None,
            _ = tick.tick() => if watchdog {
                // From the engines' progress, not from this timer alone: a hung engine stops the pings.
                if scheduler.engines_alive(Duration::from_micros(watchdog_usec)) {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("an engine thread made no progress for a watchdog period");
                }
            },
        }
    }
}

/// Shutdown: no new requests; in-flight ones get the grace period, then are cancelled, and the
/// name is released once their callers have been told.
async fn shut_down(conn: &zbus::Connection, scheduler: &Scheduler, grace: Duration) {
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(grace_s = grace.as_secs(), "shutting down");
    if tokio::time::timeout(grace, scheduler.drained()).await.is_err() {
        tracing::warn!("the grace period is over: cancelling the requests still running");
    }
    let stopper = scheduler.clone();
    let _ = tokio::task::spawn_blocking(move || stopper.shutdown()).await;
    // The cancelled requests' Finished signals go out before the name does (bounded: a caller
    // that stopped reading must not hold the daemon up).
    let _ = tokio::time::timeout(Duration::from_secs(2), scheduler.drained()).await;
    // A method's reply (Complete, Chat) goes out after its handler returns, which the drain
    // counts as its end: a moment for the last of them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = conn.release_name(BUS_NAME).await;
    tracing::info!("stopped");
}

/// How often freed heap is handed back to the system.
const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(30);

/// How often the daemon asks the bus whether it is still there, and how long an answer may take.
const BUS_PING_INTERVAL: Duration = Duration::from_secs(5);
const BUS_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Returns why the daemon is off the bus: the connection closed (dbus-daemon dropped it, or the
/// bus stopped or restarted), the bus stopped answering, or the name is no longer ours. A daemon
/// off the bus keeps running deaf otherwise, and the watchdog, fed by engine progress, would not
/// notice. The question asked is `GetNameOwner` of the bus driver, which every bus's policy
/// allows (the system bus refuses a `Peer.Ping` to the driver).
async fn watch_bus(conn: &zbus::Connection) -> String {
    let mut tick = tokio::time::interval(BUS_PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(me) = conn.unique_name().map(|n| n.to_string()) else { return "the connection has no unique name".into() };
    let dbus = match DBusProxy::new(conn).await {
        Ok(dbus) => dbus,
        Err(e) => return format!("cannot talk to the bus driver: {e}"),
    };
    loop {
        tokio::select! {
            _ = conn.closed() => return "the connection to the bus closed".into(),
            _ = tick.tick() => {
                let asked = dbus.get_name_owner(BUS_NAME.try_into().expect("a well-known name"));
                match tokio::time::timeout(BUS_PING_TIMEOUT, asked).await {
                    Ok(Ok(owner)) if owner.as_str() == me => {}
                    Ok(Ok(owner)) => return format!("{BUS_NAME} is owned by {owner} now, not by this daemon ({me})"),
                    Ok(Err(e)) if conn.is_closed() => return format!("the connection to the bus closed ({e})"),
                    Ok(Err(e)) => return format!("the bus did not say who owns {BUS_NAME}: {e}"),
                    Err(_) => return format!("the bus did not answer within {} s", BUS_PING_TIMEOUT.as_secs()),
                }
            }
        }
    }
}

/// SIGHUP: read the config again; apply it if it validates, keep the running one otherwise.
fn reload(current: &mut Config, scheduler: &Scheduler) {
    notify(&[sd_notify::NotifyState::Reloading]);
    match Config::load(&current.file) {
        Err(e) => tracing::error!("config rejected, keeping the running one: {e}"),
        Ok(new) => {
            if new.runtime_library != current.runtime_library {
                tracing::warn!("[runtime] library changed: that takes a restart of edgellmd");
            }
            if new.daemon.bus != current.daemon.bus
                || new.daemon.admin_group != current.daemon.admin_group
                || new.daemon.log_text != current.daemon.log_text
            {
                tracing::warn!("[daemon] settings changed: they take a restart of edgellmd");
            }
            let changes = scheduler.reload(&new);
            tracing::info!(?changes, "config reloaded");
            let preloader = scheduler.clone();
            tokio::spawn(async move { preloader.preload().await });
            *current = new;
        }
    }
    notify(&[sd_notify::NotifyState::Ready]);
}

/// The user id the daemon runs as (read from /proc to avoid an unsafe libc call).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)).and_then(|u| u.parse().ok()))
        .unwrap_or(0)
}
