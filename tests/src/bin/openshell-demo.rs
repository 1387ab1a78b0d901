//! The main job (`cargo xtask demo`): one real sandbox whose policy allows one thing and denies
//! another, and shows both.
//!
//! A test host in its own network namespace (198.18.N.10) plays `demo.openshell.test`, with a
//! real DNS server and a real HTTP server. A gateway with its own state directory runs a sandbox
//! whose policy lets `curl` reach that host on port 80 and nothing else. Then:
//! 1. `curl http://demo.openshell.test/` in the sandbox gets the page (allowed);
//! 2. `python3` asking for the same URL is refused (denied: python3 is not in the block);
//! 3. `curl` to a name that no policy allows gets no DNS answer (denied, never sent upstream);
//! 4. `openshell logs` shows the decisions, and the sandbox is deleted.
//!
//! Needs root (cgroups, eBPF, network namespaces). Everything it creates is removed at the end.

use std::{
    process::{Child, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use openshell_tests::{dns::TestDns, gateway::TestGateway, netns::TestNet};

const HOST: &str = "demo.openshell.test";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Kills the test host's HTTP server when the demo ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn show(args: &[&str], run: &openshell_tests::gateway::Run) {
    println!("$ openshell {}", args.join(" "));
    print!("{}", run.stdout);
    if !run.stderr.is_empty() {
        print!("{}", run.stderr);
    }
    println!(
        "[exit code {}]",
        run.code.map_or("signal".into(), |c| c.to_string())
    );
}

fn run() -> anyhow::Result<()> {
    if !openshell_tests::is_root() {
        bail!("the demo creates cgroups, eBPF programs and a network namespace: run it as root");
    }

    step("Test host: a network namespace playing demo.openshell.test, with DNS and HTTP");
    let net = TestNet::new().context("creating the test host's network namespace")?;
    let dns = TestDns::start_in(&net).context("starting the test host's DNS server")?;
    dns.add(HOST, net.ns_v4().into());
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "hello from demo.openshell.test: this request was allowed by the policy\n",
    )?;
    let server = net
        .command("python3")
        .args([
            "-m",
            "http.server",
            "80",
            "--bind",
            &net.ns_v4().to_string(),
        ])
        .arg("--directory")
        .arg(site.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting python3 -m http.server in the test host")?;
    let _server = KillOnDrop(server);
    wait_for_port(&net, 80)?;
    println!("{HOST} = {} (DNS at {})", net.ns_v4(), dns.addr());

    let gw = TestGateway::new()?;
    std::fs::write(
        &gw.config,
        format!(
            "[gateway]\ncgroup_base = \"{}\"\n\
             [proxy]\ntransparent_listen = \"127.0.0.1:0\"\n\
             [dns]\nlisten = \"127.0.0.1:0\"\nupstream = [\"{}\"]\n",
            gw.cgroup_base,
            dns.addr()
        ),
    )?;
    let policy_path = gw.dir.path().join("demo-policy.yaml");
    let policy = format!(
        "version: 1\n\
         network_policies:\n\
         \x20 demo_site:\n\
         \x20   name: demo-site\n\
         \x20   endpoints:\n\
         \x20     - host: {HOST}\n\
         \x20       port: 80\n\
         \x20   binaries:\n\
         \x20     - {{ path: /usr/bin/curl }}\n"
    );
    std::fs::write(&policy_path, &policy)?;
    step("The sandbox policy: curl may reach demo.openshell.test:80, nothing else may");
    print!("{policy}");

    let policy_arg = policy_path.display().to_string();
    step("Allowed: curl in the sandbox fetches the page");
    let args = [
        "sandbox",
        "create",
        "--name",
        "demo",
        "--policy",
        &policy_arg,
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://demo.openshell.test/",
    ];
    let allowed = gw.run(&args)?;
    show(&args, &allowed);

    step("Denied: python3 (not listed in the block) asks for the same page");
    let script = "import urllib.request\n\
                  try:\n    urllib.request.urlopen('http://demo.openshell.test/', timeout=10)\n    print('python3: got the page')\n\
                  except Exception as e:\n    print('python3: refused:', e)\n    raise SystemExit(1)\n";
    let args = ["sandbox", "exec", "demo", "--", "python3", "-c", script];
    let denied = gw.run(&args)?;
    show(
        &[
            "sandbox",
            "exec",
            "demo",
            "--",
            "python3",
            "-c",
            "<urlopen http://demo.openshell.test/>",
        ],
        &denied,
    );

    step("Denied: a name no policy allows is not even resolved (and never sent upstream)");
    let args = [
        "sandbox",
        "exec",
        "demo",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://exfil.example.com/",
    ];
    let nxdomain = gw.run(&args)?;
    show(&args, &nxdomain);
    println!(
        "upstream DNS saw exfil.example.com: {}",
        dns.saw("exfil.example.com")
    );

    step("The decision log");
    let args = ["logs", "demo"];
    let logs = wait_for_logs(&gw, 2)?;
    show(&args, &logs);

    let args = ["sandbox", "delete", "demo"];
    let deleted = gw.run(&args)?;
    show(&args, &deleted);

    let ok = allowed.code == Some(0)
        && allowed.stdout.contains("allowed by the policy")
        && denied.code != Some(0)
        && nxdomain.code != Some(0)
        && !dns.saw("exfil.example.com")
        && logs.stdout.contains("ALLOW")
        && logs.stdout.contains("DENY");
    if !ok {
        bail!("the sandbox did not behave as the policy says (see above)");
    }
    step("Done: one request allowed, two denied, all logged. Everything the demo made is removed.");
    Ok(())
}

fn wait_for_port(net: &TestNet, port: u16) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::new(net.ns_v4().into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the test host's HTTP server did not come up on {addr}")
}

fn wait_for_logs(gw: &TestGateway, lines: usize) -> anyhow::Result<openshell_tests::gateway::Run> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = gw.run(&["logs", "demo"])?;
        if run.stdout.lines().count() >= lines || Instant::now() > deadline {
            return Ok(run);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
