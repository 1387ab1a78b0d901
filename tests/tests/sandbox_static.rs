//! Static enforcement of sandboxed processes (issue 4): real processes launched as root through
//! `openshell::sandbox::spawn`, each test with its own directories and cgroup.

use openshell_tests::sandbox::{TestSandbox, privileged, run};

#[test]
fn id_shows_the_sandbox_user() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let sandbox = TestSandbox::new("id")?;
    let spec = sandbox.seed_spec(&["id", "-u"])?;
    let finished = run(&spec)?.map_err(anyhow::Error::from)?;
    eprintln!("{finished:#?}\n{}", finished.report);
    Ok(())
}
