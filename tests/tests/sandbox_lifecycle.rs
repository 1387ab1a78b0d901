//! Sandbox lifecycle through the real CLI and a real gateway (root: cgroups, processes).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use openshell_tests::{
    gateway::{CALL_TIMEOUT, TestGateway, process_exited, run_with_timeout},
    require_root, sandbox_names as names,
};

#[test]
fn create_exec_list_get_delete_round_trip() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let created = gw
        .run(&[
            "sandbox", "create", "--name", "rt", "-o", "json", "--", "true",
        ])?
        .ok()?;
    // The first stdout line is the sandbox as created.
    let first = created.stdout.lines().next().context("no output")?;
    let info: serde_json::Value = serde_json::from_str(first)?;
    assert_eq!(info["name"], "rt");
    assert!(
        created.stderr.contains("started one in the background"),
        "{}",
        created.stderr
    );

    // A file written by one command is there for the next: the working directory persists.
    gw.run(&[
        "sandbox",
        "exec",
        "rt",
        "--",
        "sh",
        "-c",
        "echo persisted > note",
    ])?
    .ok()?;
    let read = gw
        .run(&["sandbox", "exec", "rt", "--", "cat", "note"])?
        .ok()?;
    assert_eq!(read.stdout, "persisted\n");

    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert_eq!(names(&list), vec!["rt"]);
    assert_eq!(list[0]["status"], "idle");
    assert_eq!(list[0]["processes"], 0);

    let get = gw
        .run(&["sandbox", "get", "rt", "-o", "json"])?
        .ok()?
        .json()?;
    assert_eq!(get["name"], "rt");
    assert!(get["report"].is_object(), "no enforcement report: {get}");
    assert_eq!(get["static_policy"]["run_as_user"], "sandbox");
    let workdir = get["workdir"].as_str().context("workdir")?.to_owned();
    assert!(Path::new(&workdir).join("note").is_file());
    assert!(gw.cgroup_dir("rt")?.is_dir());

    let deleted = gw
        .run(&["sandbox", "delete", "rt", "-o", "json"])?
        .ok()?
        .json()?;
    assert_eq!(deleted["deleted"], serde_json::json!(["rt"]));
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(names(&list).is_empty(), "{list}");
    assert!(!gw.cgroup_dir("rt")?.exists(), "cgroup left behind");
    assert!(
        !Path::new(&workdir).exists(),
        "working directory left behind"
    );

    let missing = gw.run(&["sandbox", "get", "rt"])?;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("no sandbox named \"rt\""),
        "{}",
        missing.stderr
    );
    Ok(())
}

#[test]
fn exit_code_is_relayed() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let run = gw.run(&[
        "sandbox", "create", "--name", "ex", "--", "sh", "-c", "exit 42",
    ])?;
    assert_eq!(run.code, Some(42), "{run:?}");
    let run = gw.run(&[
        "sandbox",
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])?;
    assert_eq!(run.code, Some(3));
    assert_eq!(run.stdout, "out\n");
    assert!(run.stderr.ends_with("err\n"), "{}", run.stderr);
    // Killed by a signal: 128 + signal number, as a shell reports it.
    let run = gw.run(&["sandbox", "exec", "ex", "--", "sh", "-c", "kill -9 $$"])?;
    assert_eq!(run.code, Some(137));
    // stdin is the CLI's own.
    let mut cmd = gw.command();
    cmd.args(["sandbox", "exec", "ex", "--", "tr", "a-z", "A-Z"]);
    let run = run_with_timeout(cmd, b"shout\n", CALL_TIMEOUT)?.ok()?;
    assert_eq!(run.stdout, "SHOUT\n");
    Ok(())
}

#[test]
fn no_keep_deletes_the_sandbox_and_keep_is_the_default() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let run = gw.run(&[
        "sandbox",
        "create",
        "--name",
        "gone",
        "--no-keep",
        "--",
        "sh",
        "-c",
        "exit 4",
    ])?;
    assert_eq!(run.code, Some(4), "{run:?}");
    gw.run(&["sandbox", "create", "--name", "kept", "--", "true"])?
        .ok()?;
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert_eq!(names(&list), vec!["kept"]);
    assert!(!gw.cgroup_dir("gone")?.exists());
    assert!(!gw.state_dir().join("sandboxes/gone").exists());
    Ok(())
}

#[test]
fn generated_name_is_printed_and_listed() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let run = gw.run(&["sandbox", "create", "--", "true"])?.ok()?;
    let name = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("Created sandbox "))
        .context(format!("no name printed: {}", run.stderr))?
        .to_owned();
    let parts: Vec<&str> = name.split('-').collect();
    assert_eq!(parts.len(), 3, "{name}");
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert_eq!(names(&list), vec![name]);
    Ok(())
}

#[test]
fn policy_comes_from_flag_then_env_then_default() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let env_policy = gw.state_dir().join("env-policy.yaml");
    let flag_policy = gw.state_dir().join("flag-policy.yaml");
    let text = openshell::cli::sandbox::DEFAULT_POLICY;
    std::fs::write(&env_policy, text)?;
    std::fs::write(&flag_policy, text)?;

    let mut cmd = gw.command();
    cmd.env("OPENSHELL_SANDBOX_POLICY", &env_policy)
        .args(["sandbox", "create", "--name", "from-env", "--", "true"]);
    run_with_timeout(cmd, b"", CALL_TIMEOUT)?.ok()?;

    let mut cmd = gw.command();
    cmd.env("OPENSHELL_SANDBOX_POLICY", &env_policy).args([
        "sandbox",
        "create",
        "--name",
        "from-flag",
        "--policy",
    ]);
    cmd.arg(&flag_policy).args(["--", "true"]);
    run_with_timeout(cmd, b"", CALL_TIMEOUT)?.ok()?;

    gw.run(&["sandbox", "create", "--name", "from-default", "--", "true"])?
        .ok()?;

    let source = |name: &str| -> Result<String> {
        let get = gw
            .run(&["sandbox", "get", name, "-o", "json"])?
            .ok()?
            .json()?;
        Ok(get["policy_source"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(source("from-env")?, env_policy.display().to_string());
    assert_eq!(source("from-flag")?, flag_policy.display().to_string());
    assert_eq!(source("from-default")?, "policies/default.yaml");

    // A policy file that does not exist is named in the error, and nothing is created.
    let mut cmd = gw.command();
    cmd.env("OPENSHELL_SANDBOX_POLICY", "/nonexistent/p.yaml")
        .args(["sandbox", "create", "--name", "nope", "--", "true"]);
    let run = run_with_timeout(cmd, b"", CALL_TIMEOUT)?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("/nonexistent/p.yaml")
            && run.stderr.contains("OPENSHELL_SANDBOX_POLICY"),
        "{}",
        run.stderr
    );
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(!names(&list).contains(&"nope".to_owned()));
    Ok(())
}

#[test]
fn delete_all_kills_every_process() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    for name in ["d1", "d2"] {
        gw.run(&[
            "sandbox",
            "create",
            "--name",
            name,
            "--",
            "sh",
            "-c",
            "sleep 300 </dev/null >/dev/null 2>&1 &",
        ])?
        .ok()?;
    }
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert_eq!(list[0]["status"], "running", "{list}");
    let pids = std::fs::read_to_string(gw.cgroup_dir("d1")?.join("cgroup.procs"))?;
    let pid = pids.trim().to_owned();
    ensure!(!pid.is_empty(), "no process in d1");
    gw.run(&["sandbox", "delete", "--all"])?.ok()?;
    assert!(
        process_exited(&pid, Duration::from_secs(10)),
        "process {pid} survived delete"
    );
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(names(&list).is_empty());
    Ok(())
}

#[test]
fn invalid_names_and_duplicates_are_refused() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let run = gw.run(&["sandbox", "create", "--name", "../x", "--", "true"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("invalid sandbox name"),
        "{}",
        run.stderr
    );
    gw.run(&["sandbox", "create", "--name", "dup", "--", "true"])?
        .ok()?;
    let run = gw.run(&["sandbox", "create", "--name", "dup", "--", "true"])?;
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    Ok(())
}

/// Redacts what changes from run to run.
fn redact(text: &str, gw: &TestGateway) -> Result<String> {
    let mut out = text.replace(&gw.state_dir().display().to_string(), "[STATE]");
    out = out.replace(&gw.cgroup_base_dir()?.display().to_string(), "[CGROUP]");
    let lines: Vec<String> = out
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("identity:") {
                // uid and gid of the `sandbox` account differ between hosts.
                l.split(' ')
                    .map(|w| {
                        let digits = w.trim_end_matches(',');
                        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                            w.replace(digits, "[ID]")
                        } else {
                            w.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else if l.starts_with("Created:") {
                "Created:    [TIME]".to_owned()
            } else if l.starts_with("snap ") {
                // The AGE column (last, unpadded) of the list table.
                let kept = l.rsplit_once(' ').map_or(l, |(head, _)| head);
                format!("{kept} [AGE]")
            } else {
                l.to_owned()
            }
        })
        .collect();
    Ok(lines.join("\n"))
}

#[test]
fn list_and_get_tables() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&["sandbox", "create", "--name", "snap", "--", "true"])?
        .ok()?;
    let list = gw.run(&["sandbox", "list"])?.ok()?;
    insta::assert_snapshot!("sandbox_list", redact(&list.stdout, &gw)?);
    let get = gw.run(&["sandbox", "get", "snap"])?.ok()?;
    insta::assert_snapshot!("sandbox_get", redact(&get.stdout, &gw)?);
    Ok(())
}

/// Drives the CLI from a real pty (python3's `pty` module), as a user's terminal would.
const PTY_DRIVER: &str = r#"
import json, os, pty, select, struct, sys, time, fcntl, termios
argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out = b""
def read_until(pat, timeout=20.0):
    global out
    end = time.time() + timeout
    while pat not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
    return pat in out
steps = {}
steps["prompt"] = read_until(b"OSPROMPT")
os.write(fd, b"echo $((6*7))-answer; tty\n")
steps["echo"] = read_until(b"42-answer")
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 41, 133, 0, 0))
steps["winsize"] = False
for _ in range(20):
    os.write(fd, b"stty size\n")
    if read_until(b"41 133", 0.5):
        steps["winsize"] = True
        break
os.write(fd, b"exit 9\n")
read_until(b"\x00never", 3.0)
_, status = os.waitpid(pid, 0)
print(json.dumps({"steps": steps, "code": os.waitstatus_to_exitcode(status), "out": out.decode("utf-8", "replace")}))
"#;

#[test]
fn interactive_session_through_a_real_pty() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let bin = openshell_tests::openshell_bin();
    let mut py = std::process::Command::new("python3");
    py.env("OPENSHELL_STATE_DIR", gw.state_dir())
        .env("OPENSHELL_GATEWAY_CONFIG", &gw.config)
        .env_remove("OPENSHELL_SANDBOX_POLICY")
        .arg("-c")
        .arg(PTY_DRIVER)
        .arg(&bin)
        .args([
            "sandbox",
            "create",
            "--name",
            "tty",
            "--",
            "/bin/sh",
            "-c",
            // An interactive shell with a recognisable prompt.
            "PS1=OSPROMPT' ' exec /bin/sh -i",
        ]);
    let run = run_with_timeout(py, b"", CALL_TIMEOUT + Duration::from_secs(30))?.ok()?;
    let result: serde_json::Value = run.json()?;
    assert_eq!(result["steps"]["prompt"], true, "{result}");
    assert_eq!(result["steps"]["echo"], true, "{result}");
    let out = result["out"].as_str().unwrap_or_default();
    assert!(out.contains("/dev/pts/"), "not a terminal: {out}");
    assert_eq!(
        result["steps"]["winsize"], true,
        "window size not forwarded: {result}"
    );
    assert_eq!(result["code"], 9, "{result}");
    Ok(())
}

#[test]
fn signals_to_the_cli_reach_the_command() -> Result<()> {
    use std::io::BufRead as _;
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&["sandbox", "create", "--name", "sig", "--", "true"])?
        .ok()?;
    let mut cmd = gw.command();
    cmd.args([
        "sandbox", "exec", "sig", "--", "sh", "-c",
        "trap 'echo got-term; exit 77' TERM; echo ready; i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let first = lines.next().context("no output")??;
    assert_eq!(first, "ready");
    // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
    unsafe {
        libc::kill(i32::try_from(child.id())?, libc::SIGTERM);
    }
    let second = lines.next().context("no output after SIGTERM")??;
    assert_eq!(second, "got-term");
    let status = child.wait()?;
    assert_eq!(status.code(), Some(77));
    Ok(())
}

#[test]
fn a_command_that_cannot_start_fails_create_and_leaves_nothing() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let run = gw.run(&[
        "sandbox",
        "create",
        "--name",
        "bad",
        "--",
        "/nonexistent/program",
    ])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("sandbox create failed") && run.stderr.contains("/nonexistent/program"),
        "{}",
        run.stderr
    );
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(names(&list).is_empty(), "{list}");
    assert!(!gw.cgroup_dir("bad")?.exists());
    Ok(())
}

#[test]
fn a_policy_naming_root_is_refused_with_the_validation_format() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let policy = gw.state_dir().join("root.yaml");
    std::fs::write(
        &policy,
        "version: 1\nprocess:\n  run_as_user: root\n  run_as_group: sandbox\n",
    )?;
    let mut cmd = gw.command();
    cmd.args(["sandbox", "create", "--name", "r00t", "--policy"])
        .arg(&policy)
        .args(["--", "id", "-u"]);
    let run = run_with_timeout(cmd, b"", CALL_TIMEOUT)?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.is_empty(), "the command ran: {}", run.stdout);
    // FILE:LINE:COL: error: MESSAGE (at FIELD.PATH)
    let expected = format!("{}:3:16: error: ", policy.display());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains(&expected))
        .context(format!("no validation error line in:\n{}", run.stderr))?;
    assert!(line.contains("(at process.run_as_user)"), "{line}");
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(names(&list).is_empty(), "{list}");
    Ok(())
}

#[test]
fn hard_requirement_missing_path_fails_create_before_the_command_runs() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    let policy = gw.state_dir().join("hard.yaml");
    let marker = gw.state_dir().join("ran");
    std::fs::write(
        &policy,
        "version: 1\nfilesystem_policy:\n  read_only: [/usr, /lib, /etc, /opt/openshell-missing-path]\n  read_write: [/sandbox, /tmp]\nlandlock:\n  compatibility: hard_requirement\n",
    )?;
    let mut cmd = gw.command();
    cmd.args(["sandbox", "create", "--name", "hard", "--policy"])
        .arg(&policy)
        .args(["--", "touch"])
        .arg(&marker);
    let run = run_with_timeout(cmd, b"", CALL_TIMEOUT)?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("sandbox create failed")
            && run.stderr.contains("/opt/openshell-missing-path"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists(), "the command ran");
    let list = gw.run(&["sandbox", "list", "-o", "json"])?.ok()?.json()?;
    assert!(names(&list).is_empty(), "{list}");

    // best_effort: the same path is skipped with one warning line and the command runs.
    std::fs::write(
        &policy,
        "version: 1\nfilesystem_policy:\n  read_only: [/usr, /lib, /etc, /opt/openshell-missing-path]\n  read_write: [/sandbox, /tmp]\nlandlock:\n  compatibility: best_effort\n",
    )?;
    let mut cmd = gw.command();
    cmd.args(["sandbox", "create", "--name", "soft", "--policy"])
        .arg(&policy)
        .args(["--", "true"]);
    let run = run_with_timeout(cmd, b"", CALL_TIMEOUT)?.ok()?;
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("/opt/openshell-missing-path"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    Ok(())
}

#[test]
fn sandbox_processes_run_confined() -> Result<()> {
    require_root!();
    let gw = TestGateway::new()?;
    gw.run(&["sandbox", "create", "--name", "conf", "--", "true"])?
        .ok()?;
    let run = gw
        .run(&[
            "sandbox", "exec", "conf", "--", "sh", "-c",
            "id -un; pwd; touch /sandbox/ok && echo sandbox-writable; touch /usr/nope 2>/dev/null || echo usr-denied",
        ])?
        .ok()?;
    assert_eq!(
        run.stdout, "sandbox\n/sandbox\nsandbox-writable\nusr-denied\n",
        "{}",
        run.stderr
    );
    Ok(())
}
