//! Step 2: no-new-privileges and empty capability sets.
//!
//! After this step no exec can gain privileges (setuid bits and file capabilities are ignored),
//! and the bounding set is empty, so even a later uid 0 could not hold a capability. The
//! effective and permitted sets are still full here: the identity switch that follows needs
//! CAP_SETUID/CAP_SETGID, and leaving uid 0 clears them.

use super::error::{SetupError, Step};

const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";

/// Sets `PR_SET_NO_NEW_PRIVS`.
pub(crate) fn set_no_new_privs() -> Result<(), SetupError> {
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| SetupError::sys(Step::NoNewPrivs, "prctl(PR_SET_NO_NEW_PRIVS)", e))?;
    match nix::sys::prctl::get_no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => Err(SetupError::new(Step::NoNewPrivs, "the flag did not stick")),
        Err(e) => Err(SetupError::sys(
            Step::NoNewPrivs,
            "prctl(PR_GET_NO_NEW_PRIVS)",
            e,
        )),
    }
}

/// Empties the bounding, ambient and inheritable sets; returns how many capabilities the
/// bounding set could hold (all of them were dropped).
pub(crate) fn clear_capabilities() -> Result<u32, SetupError> {
    // The kernel may know capabilities newer than the caps crate: go by the kernel's count.
    let last = std::fs::read_to_string(CAP_LAST_CAP)
        .map_err(|e| SetupError::io(Step::Capabilities, "reading", &e).at(CAP_LAST_CAP))?;
    let last: u32 = last.trim().parse().map_err(|_| {
        SetupError::new(Step::Capabilities, format!("unexpected content {last:?}")).at(CAP_LAST_CAP)
    })?;
    for cap in 0..=last {
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            return Err(SetupError::sys(
                Step::Capabilities,
                format!("prctl(PR_CAPBSET_DROP, {cap})"),
                nix::Error::last(),
            ));
        }
        // SAFETY: as above, PR_CAPBSET_READ only reads a flag.
        let still =
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
        if still != 0 {
            return Err(SetupError::new(
                Step::Capabilities,
                format!("capability {cap} is still in the bounding set after dropping it"),
            ));
        }
    }
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable] {
        caps::clear(None, set).map_err(|e| {
            SetupError::new(Step::Capabilities, format!("clearing the {set:?} set: {e}"))
        })?;
        let held = caps::read(None, set).map_err(|e| {
            SetupError::new(Step::Capabilities, format!("reading the {set:?} set: {e}"))
        })?;
        if !held.is_empty() {
            return Err(SetupError::new(
                Step::Capabilities,
                format!("the {set:?} set still holds {held:?} after clearing it"),
            ));
        }
    }
    Ok(last + 1)
}
