//! Step 5: the seccomp filter (libseccomp).
//!
//! Everything not named here is allowed; what is named fails with EPERM, except `clone3`, which
//! fails with ENOSYS so that libc falls back to `clone`, whose flags a filter can read. System
//! calls made through another ABI than the native one (x32, i386 `int 0x80`) kill the process
//! (`set_act_badarch`), which also covers the 32-bit `socketcall` multiplexer.
//!
//! Socket creation is an allow-list: AF_UNIX; AF_INET and AF_INET6 as SOCK_STREAM with protocol
//! 0/TCP or SOCK_DGRAM with protocol 0/UDP (the type compared under the 0xf mask, so
//! SOCK_NONBLOCK and SOCK_CLOEXEC pass); AF_NETLINK with NETLINK_ROUTE only. Other protocols
//! (SCTP, UDP-Lite, ICMP, MPTCP) are refused because the cgroup connect hooks that enforce network
//! policy only see TCP and UDP. The kernel ignores the upper 32 bits of `int` arguments while a
//! filter sees all 64, so every "not in the list" rule also refuses values above the highest
//! allowed one instead of enumerating only the low ones.
//!
//! Each rule is written as "EPERM when ...", with one comparison per argument, because that is
//! the form libseccomp accepts for every version on this host.

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

use super::error::{SetupError, Step};
use super::report::SeccompReport;

const STEP: Step = Step::Seccomp;

/// Linux 6.15; numbers from 424 on are the same on every architecture. Not in libc yet.
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// Blocked outright (EPERM), with their names for the report.
const BLOCKED: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
];

/// Namespace flags refused in `clone` (CLONE_NEWTIME shares its bit with the exit signal there).
const CLONE_NS_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// Terminal ioctls that inject input into, or reconfigure, a terminal the sandbox shares.
const BLOCKED_IOCTLS: &[(&str, libc::c_ulong)] =
    &[("TIOCSTI", libc::TIOCSTI), ("TIOCLINUX", libc::TIOCLINUX)];

/// `personality` may only query (0xffffffff) or set the default PER_LINUX (0).
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

const AF_UNIX: u64 = libc::AF_UNIX as u64;
const AF_INET: u64 = libc::AF_INET as u64;
const AF_INET6: u64 = libc::AF_INET6 as u64;
const AF_NETLINK: u64 = libc::AF_NETLINK as u64;
const SOCK_TYPE_MASK: u64 = 0xf;
const SOCK_STREAM: u64 = libc::SOCK_STREAM as u64;
const SOCK_DGRAM: u64 = libc::SOCK_DGRAM as u64;
const IPPROTO_TCP: u64 = libc::IPPROTO_TCP as u64;
const IPPROTO_UDP: u64 = libc::IPPROTO_UDP as u64;

/// One "EPERM when every comparison holds" rule.
struct Rule {
    syscall: libc::c_long,
    action: ScmpAction,
    args: Vec<ScmpArgCompare>,
}

fn eq(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::Equal, value)
}
fn gt(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::Greater, value)
}
fn masked(arg: u32, mask: u64, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(mask), value)
}

fn eperm(syscall: libc::c_long, args: Vec<ScmpArgCompare>) -> Rule {
    Rule {
        syscall,
        action: ScmpAction::Errno(libc::EPERM),
        args,
    }
}

/// EPERM rules for `syscall` whenever argument `arg` is not in `allowed`: every value in the
/// gaps below the largest allowed one, and anything above it (upper 32 bits included).
fn not_in(syscall: libc::c_long, arg: u32, allowed: &[u64], with: &[ScmpArgCompare]) -> Vec<Rule> {
    let highest = allowed.iter().copied().max().unwrap_or(0);
    let mut rules: Vec<Rule> = (0..highest)
        .filter(|v| !allowed.contains(v))
        .map(|v| eperm(syscall, [with, &[eq(arg, v)]].concat()))
        .collect();
    rules.push(eperm(syscall, [with, &[gt(arg, highest)]].concat()));
    rules
}

/// socket(domain, type, protocol): the allow-list described in the module docs.
fn socket_rules() -> Vec<Rule> {
    let sys = libc::SYS_socket;
    let mut rules = not_in(sys, 0, &[AF_UNIX, AF_INET, AF_INET6, AF_NETLINK], &[]);
    for family in [AF_INET, AF_INET6] {
        let fam = eq(0, family);
        for ty in (0..=SOCK_TYPE_MASK).filter(|t| ![SOCK_STREAM, SOCK_DGRAM].contains(t)) {
            rules.push(eperm(sys, vec![fam, masked(1, SOCK_TYPE_MASK, ty)]));
        }
        let stream = [fam, masked(1, SOCK_TYPE_MASK, SOCK_STREAM)];
        rules.extend(not_in(sys, 2, &[0, IPPROTO_TCP], &stream));
        let dgram = [fam, masked(1, SOCK_TYPE_MASK, SOCK_DGRAM)];
        rules.extend(not_in(sys, 2, &[0, IPPROTO_UDP], &dgram));
    }
    // NETLINK_ROUTE is protocol 0.
    rules.extend(not_in(
        sys,
        2,
        &[libc::NETLINK_ROUTE as u64],
        &[eq(0, AF_NETLINK)],
    ));
    rules
}

fn all_rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = BLOCKED
        .iter()
        .map(|(_, nr)| eperm(*nr, Vec::new()))
        .collect();
    rules.extend(socket_rules());
    // socketpair only makes sense for AF_UNIX.
    rules.extend(not_in(libc::SYS_socketpair, 0, &[AF_UNIX], &[]));
    for flag in CLONE_NS_FLAGS {
        let flag = *flag as u64;
        rules.push(eperm(libc::SYS_clone, vec![masked(0, flag, flag)]));
        rules.push(eperm(libc::SYS_unshare, vec![masked(0, flag, flag)]));
    }
    let newtime = libc::CLONE_NEWTIME as u64;
    rules.push(eperm(libc::SYS_unshare, vec![masked(0, newtime, newtime)]));
    rules.push(Rule {
        syscall: libc::SYS_clone3,
        action: ScmpAction::Errno(libc::ENOSYS),
        args: Vec::new(),
    });
    for (_, request) in BLOCKED_IOCTLS {
        rules.push(eperm(
            libc::SYS_ioctl,
            vec![masked(1, 0xffff_ffff, u64::from(*request as u32))],
        ));
    }
    rules.extend(
        personality_rules()
            .into_iter()
            .map(|cmp| eperm(libc::SYS_personality, vec![cmp])),
    );
    rules
}

/// EPERM comparisons for `personality(persona)` unless `persona` is 0 or 0xffffffff.
///
/// libseccomp allows one comparison per argument in a rule, so "neither 0 nor all ones" is
/// written with bit tests: a 32-bit value that is neither has, going round its bits cyclically,
/// some bit i that is set while bit i+1 is clear (a constant cycle has no such step). That is 32
/// masked comparisons, plus one for values with upper bits, which the kernel would truncate.
fn personality_rules() -> Vec<ScmpArgCompare> {
    let mut rules: Vec<ScmpArgCompare> = personality_masks()
        .into_iter()
        .map(|(mask, value)| masked(0, mask, value))
        .collect();
    rules.push(gt(0, PERSONALITY_QUERY));
    rules
}

/// The (mask, value) pairs of [`personality_rules`]: bit i set, bit i+1 (mod 32) clear.
fn personality_masks() -> Vec<(u64, u64)> {
    (0..32)
        .map(|i| {
            let bit = 1u64 << i;
            let next = 1u64 << ((i + 1) % 32);
            (bit | next, bit)
        })
        .collect()
}

/// What the report lists for the filter.
pub(crate) fn describe() -> SeccompReport {
    SeccompReport {
        enabled: true,
        blocked: BLOCKED.iter().map(|(name, _)| (*name).to_owned()).collect(),
        restricted: vec![
            "socket: AF_UNIX; AF_INET/AF_INET6 SOCK_STREAM (TCP) or SOCK_DGRAM (UDP); AF_NETLINK \
             NETLINK_ROUTE"
                .to_owned(),
            "socketpair: AF_UNIX".to_owned(),
            "clone, unshare: no namespace flags".to_owned(),
            "ioctl: no TIOCSTI, TIOCLINUX".to_owned(),
            "personality: query or PER_LINUX only".to_owned(),
        ],
        enosys: vec!["clone3".to_owned()],
        foreign_arch: "kill process".to_owned(),
    }
}

/// Builds the filter without loading it (tests inspect it).
pub(crate) fn build() -> Result<ScmpFilterContext, SetupError> {
    let fail = |what: String, e: libseccomp::error::SeccompError| {
        SetupError::new(STEP, format!("{what}: {e}"))
    };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)
        .map_err(|e| fail("creating the filter".into(), e))?;
    ctx.set_act_badarch(ScmpAction::KillProcess)
        .map_err(|e| fail("setting the action for other ABIs".into(), e))?;
    // no_new_privs is set by step 2 already; the filter must not need it set again.
    ctx.set_ctl_nnp(false)
        .map_err(|e| fail("configuring no_new_privs".into(), e))?;
    for rule in all_rules() {
        let nr = i32::try_from(rule.syscall).unwrap_or(i32::MAX);
        let syscall = ScmpSyscall::from(nr);
        let name = syscall
            .get_name()
            .unwrap_or_else(|_| format!("syscall {nr}"));
        let added = if rule.args.is_empty() {
            ctx.add_rule_exact(rule.action, syscall)
        } else {
            ctx.add_rule_conditional_exact(rule.action, syscall, &rule.args)
        };
        added.map_err(|e| fail(format!("adding a rule for {name} ({:?})", rule.args), e))?;
    }
    Ok(ctx)
}

/// Loads the filter into the calling (single-threaded) process.
pub(crate) fn apply() -> Result<SeccompReport, SetupError> {
    let ctx = build()?;
    ctx.load()
        .map_err(|e| SetupError::new(STEP, format!("loading the filter: {e}")))?;
    Ok(describe())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds() {
        let ctx = build().unwrap();
        let out =
            nix::sys::memfd::memfd_create(c"bpf", nix::sys::memfd::MFdFlags::empty()).unwrap();
        ctx.export_bpf(&out).unwrap();
        // Each BPF instruction is 8 bytes; the allow-lists make for a few hundred of them.
        let size = nix::sys::stat::fstat(&out).unwrap().st_size;
        assert!(size > 8 * 100, "filter of {size} bytes");
    }

    #[test]
    fn not_in_covers_gaps_and_everything_above() {
        let rules = not_in(libc::SYS_socket, 0, &[1, 2, 10, 16], &[]);
        // 0, 3..=9, 11..=15 and "> 16".
        assert_eq!(rules.len(), 1 + 7 + 5 + 1);
    }

    /// Evaluates the personality rules the way the filter does.
    fn personality_blocked(persona: u64) -> bool {
        personality_masks()
            .iter()
            .any(|(mask, value)| persona & mask == *value)
            || persona > PERSONALITY_QUERY
    }

    #[test]
    fn personality_allows_only_the_default_and_the_query() {
        assert_eq!(personality_rules().len(), 33);
        assert!(!personality_blocked(0));
        assert!(!personality_blocked(0xffff_ffff));
        for persona in [
            1,
            8,
            0x0004_0000,
            0x0040_0000,
            0x8000_0000,
            0xffff_fffe,
            0x7fff_ffff,
            0x1_0000_0000,
        ] {
            assert!(personality_blocked(persona), "{persona:#x}");
        }
    }

    #[test]
    fn report_lists_every_blocked_call() {
        let report = describe();
        assert_eq!(report.blocked.len(), BLOCKED.len());
        assert!(report.blocked.iter().any(|s| s == "io_uring_setup"));
    }
}
