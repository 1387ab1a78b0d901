//! The eBPF object that `openshell`'s build script produces loads into this kernel, and each of its
//! cgroup sock_addr programs attaches to a throw-away cgroup. Needs root.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use openshell_tests::TestCgroup;

#[test]
fn ebpf_object_loads_and_attaches_to_a_cgroup() {
    if !openshell_tests::is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return;
    }
    let cgroup = TestCgroup::new("smoke");
    let mut ebpf = Ebpf::load(openshell::ebpf::EBPF_OBJECT).expect("load eBPF object");
    let names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
    let mut attached = 0;
    let mut links = Vec::new();
    for name in &names {
        let Some(program) = ebpf.program_mut(name) else {
            continue;
        };
        let Ok(program) = <&mut CgroupSockAddr>::try_from(program) else {
            continue;
        };
        program
            .load()
            .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        let fd = File::open(cgroup.path()).expect("open cgroup dir");
        links.push(
            program
                .attach(fd, CgroupAttachMode::Single)
                .unwrap_or_else(|e| panic!("attach {name}: {e}")),
        );
        attached += 1;
    }
    assert!(
        attached > 0,
        "no cgroup sock_addr program in the object: {names:?}"
    );
    drop(links);
}
