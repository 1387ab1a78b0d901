//! Device numbers in the kernel's internal encoding (`super_block.s_dev`).

/// A `dev_t` as the kernel stores it internally: major in the top 12 bits, minor in the low 20
/// (`MINORBITS = 20` in `include/linux/kdev_t.h`). `stat(2)` reports the same device in the
/// userspace encoding; [`KernelDev::to_userspace`] converts.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KernelDev(pub u32);

const MINOR_BITS: u32 = 20;
const MINOR_MASK: u32 = (1 << MINOR_BITS) - 1;

impl KernelDev {
    #[must_use]
    pub const fn major(self) -> u32 {
        self.0 >> MINOR_BITS
    }

    #[must_use]
    pub const fn minor(self) -> u32 {
        self.0 & MINOR_MASK
    }

    /// The device number as `stat(2)` reports it in `st_dev` (glibc's `makedev` encoding, the
    /// kernel's `new_encode_dev`).
    #[must_use]
    pub const fn to_userspace(self) -> u64 {
        let (major, minor) = (self.major() as u64, self.minor() as u64);
        ((major & 0xffff_f000) << 32)
            | ((major & 0x0000_0fff) << 8)
            | ((minor & 0xffff_ff00) << 12)
            | (minor & 0x0000_00ff)
    }
}

#[cfg(test)]
mod tests {
    use super::KernelDev;

    fn kernel(major: u32, minor: u32) -> KernelDev {
        KernelDev((major << 20) | minor)
    }

    #[test]
    fn small_device_numbers() {
        // /dev/sda1 is 8:1, st_dev 0x801.
        assert_eq!(kernel(8, 1).to_userspace(), 0x801);
        // nvme0n1p2 259:2.
        assert_eq!(kernel(259, 2).to_userspace(), (259 << 8) | 2);
    }

    #[test]
    fn anonymous_devices_with_large_minors() {
        // overlay/tmpfs get 0:N with N possibly above 255.
        let d = kernel(0, 0x1_2345);
        assert_eq!(d.major(), 0);
        assert_eq!(d.minor(), 0x1_2345);
        assert_eq!(d.to_userspace(), 0x45 | (0x123 << 20));
    }

    #[test]
    fn matches_userspace_split() {
        for (major, minor) in [
            (0u32, 0u32),
            (8, 17),
            (253, 3),
            (0, 255),
            (0, 256),
            (4095, 0xf_ffff),
        ] {
            let dev = kernel(major, minor).to_userspace();
            // glibc's major()/minor() inverse.
            let got_major = (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32;
            let got_minor = (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32;
            assert_eq!((got_major, got_minor), (major, minor));
        }
    }
}
