//! openshell's eBPF programs. Built only for the BPF target; see DESIGN.md.
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

/// Placeholder connect4 hook: allows every connect. The interception logic lands with the
/// eBPF issue; this program proves that the build, load and attach path works.
#[cgroup_sock_addr(connect4)]
pub fn openshell_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
