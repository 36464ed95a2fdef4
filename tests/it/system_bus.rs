//! The shipped D-Bus policy on a private bus configured like the system bus: edgellmd runs as
//! the service user `edgellm`; an unprivileged user may generate but cannot own the name,
//! eavesdrop, or load and unload models. Needs root (to create the users and switch to them),
//! as CI has; elsewhere it says so and does nothing.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use zbus::zvariant::Value;

use crate::kit::fixtures::{model_dir, root};

const SERVICE_USER: &str = "edgellm";
const OTHER_USER: &str = "edgellm-tester";

/// Kills a child process when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-KILL").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn ensure_user(name: &str) {
    if Command::new("id").arg(name).output().unwrap().status.success() {
        return;
    }
    let status =
        Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]).status().expect("useradd");
    assert!(status.success(), "useradd {name}");
}

fn as_user(user: &str, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={user}"), &format!("--regid={user}"), "--init-groups", "--", program]);
    cmd
}

#[test]
fn shipped_policy_on_a_system_like_bus() {
    if !Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false) {
        return edgellm::skipped::report(
            "system_bus::shipped_policy_on_a_system_like_bus",
            "needs root to create users and switch to them (CI runs as root)",
        );
    }
    ensure_user(SERVICE_USER);
    ensure_user(OTHER_USER);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("system_bus_socket");
    let address = format!("unix:path={}", socket.display());
    // The defaults of Debian's /usr/share/dbus-1/system.conf, then the shipped policy.
    let conf = dir.path().join("system.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <include>{}</include>
</busconfig>"#,
            root().join("dbus/org.edgellm.Daemon1.conf").display()
        ),
    )
    .unwrap();
    let _bus = KillOnDrop(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "dbus-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = dir.path().join("edgellm.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\naddress = \"{address}\"\nshutdown_grace_s = 1\n\n[[model]]\nname = \"kjv\"\npath = \"{}\"\n\n[[model]]\nname = \"kjv-draft\"\npath = \"{}\"\npreload = false\n",
            model_dir("kjv-target").display(),
            model_dir("kjv-draft").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("edgellmd.log");
    let mut daemon = KillOnDrop(
        as_user(SERVICE_USER, env!("CARGO_BIN_EXE_edgellmd"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let busctl = |user: &str, args: &[&str]| as_user(user, "busctl").arg(format!("--address={address}")).args(args).output().unwrap();
    let call = |user: &str, method: &str, sig: &str, args: &[&str]| {
        let mut all = vec!["call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", method, sig];
        all.extend_from_slice(args);
        busctl(user, &all)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !call(OTHER_USER, "ListModels", "", &[]).status.success()
        || !String::from_utf8_lossy(&call(OTHER_USER, "ListModels", "", &[]).stdout).contains("ready")
    {
        assert!(
            Instant::now() < deadline,
            "edgellmd did not start as {SERVICE_USER}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // An unprivileged user may generate...
    let out = call(OTHER_USER, "Complete", "ssa{sv}", &["kjv", "In the beginning", "1", "max_new_tokens", "u", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // ...but not load or unload models (the daemon checks the caller's credentials)...
    let out = call(OTHER_USER, "LoadModel", "s", &["kjv-draft"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = call(OTHER_USER, "UnloadModel", "s", &["kjv"]);
    assert!(!out.status.success());
    // ...while root may.
    let out = call("root", "LoadModel", "s", &["kjv-draft"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nobody but the service user owns the name.
    let out = busctl(
        OTHER_USER,
        &["call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su", "org.edgellm.Daemon1", "4"],
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Access denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No eavesdropping: a monitor run by the other user sees none of root's tokens.
    let monitor_out = dir.path().join("monitor.txt");
    let monitor = as_user(OTHER_USER, "dbus-monitor")
        .arg(format!("--address={address}"))
        .arg("type='signal',interface='org.edgellm.Daemon1'")
        .stdout(std::fs::File::create(&monitor_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let monitor = KillOnDrop(monitor);
    std::thread::sleep(Duration::from_millis(500));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tokens_seen_by_owner = rt.block_on(async {
        use futures_util::StreamExt;
        let conn = zbus::connection::Builder::address(address.as_str()).unwrap().build().await.unwrap();
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut finished = proxy.receive_finished().await.unwrap();
        let id = proxy.generate("kjv", "And God said", HashMap::from([("max_new_tokens", Value::U32(16))])).await.unwrap();
        let mut n = 0;
        loop {
            tokio::select! {
                Some(t) = tokens.next() => { if t.args().unwrap().request_id == id { n += 1; } }
                Some(_) = finished.next() => break,
            }
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(monitor);
    assert!(tokens_seen_by_owner > 0);
    let seen = std::fs::read_to_string(&monitor_out).unwrap_or_default();
    assert!(!seen.contains("member=Token") && !seen.contains("member=Finished"), "the other user saw: {seen}");

    let _ = Command::new("kill").arg("-TERM").arg(daemon.0.id().to_string()).status();
    let status = daemon.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}
