//! The Linux x86 boot protocol: load a bzImage (`linux-loader`), copy the initramfs into RAM,
//! write the command line and the zero page (`boot_params` with the e820 map and the RSDP
//! address), and say where the 64-bit entry point is.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::cpu::StartMode;
use crate::arch::layout::{
    ACPI_START, BOOT_STACK, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, ZERO_PAGE,
};
use crate::memory::GuestRam;

/// Errors on the boot path.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Opening or reading a file failed.
    #[error("{what} {path}: {source}")]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The kernel could not be loaded.
    #[error("kernel {path}: not a loadable bzImage or ELF vmlinux: {source}")]
    Kernel {
        /// The path.
        path: PathBuf,
        /// Loader error.
        source: linux_loader::loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit.
    #[error(
        "initrd {path} ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooBig {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Kernel end.
        kernel_end: u64,
        /// Highest address allowed.
        limit: u64,
    },
    /// Writing to guest memory failed.
    #[error("writing {what} to guest memory: {detail}")]
    Memory {
        /// What.
        what: &'static str,
        /// Error text.
        detail: String,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// The e820 map for this RAM layout.
pub fn e820_map(ram: &GuestRam) -> Vec<boot_e820_entry> {
    let mut v = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: ram.low_end() - HIMEM_START,
            r#type: E820_RAM,
        },
    ];
    for r in ram.ranges().iter().skip(1) {
        v.push(boot_e820_entry {
            addr: r.guest_addr,
            size: r.len,
            r#type: E820_RAM,
        });
    }
    v
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads kernel, initramfs, command line and zero page; returns how vCPU 0 starts.
pub fn load(ram: &GuestRam, spec: &BootSpec, rsdp: Option<u64>) -> Result<StartMode, BootError> {
    let mem = ram.mem();
    let mut kf = open("kernel", &spec.kernel)?;
    let mut magic = [0u8; 4];
    let is_elf = kf.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    kf.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::File {
            what: "kernel",
            path: spec.kernel.clone(),
            source,
        })?;
    let kerr = |source| BootError::Kernel {
        path: spec.kernel.clone(),
        source,
    };
    let res = if is_elf {
        Elf::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    } else {
        BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    };
    let mut params = boot_params::default();
    if let Some(h) = res.setup_header {
        params.hdr = h;
    } else {
        // ELF vmlinux: no setup header in the image, fill what the kernel reads.
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    // CAN_USE_HEAP: the setup heap is not used by the 64-bit entry, keep loadflags.
    params.hdr.loadflags |= 0x80;
    params.hdr.heap_end_ptr = 0xfe00;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline.trim())
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;

    if let Some(ipath) = &spec.initrd {
        let f = open("initrd", ipath)?;
        let max = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max)
        } else {
            0x37ff_ffff
        };
        let limit = ram.low_end().min(max + 1);
        let kernel_end = res.kernel_end;
        // Read at most what could fit: a larger file is refused without being read whole.
        let mut data = Vec::new();
        (&f).take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|source| BootError::File {
                what: "initrd",
                path: ipath.clone(),
                source,
            })?;
        let mut size = data.len() as u64;
        if size > limit {
            // Cut short: say how large the file is.
            size = f.metadata().map_or(size, |m| m.len().max(size));
        }
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or_else(|| BootError::InitrdTooBig {
                path: ipath.clone(),
                size,
                kernel_end,
                limit,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| BootError::Memory {
                what: "initrd",
                detail: e.to_string(),
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(ram);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = e820.len() as u8;
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r;
    }
    LinuxBootConfigurator::write_bootparams::<crate::memory::GuestMem>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Memory {
        what: "boot_params",
        detail: e.to_string(),
    })?;
    // 64-bit entry: a bzImage's is 0x200 past the protected-mode code; an ELF vmlinux's is
    // its entry point (startup_64), which the loader returns as kernel_load.
    let rip = if is_elf {
        res.kernel_load.raw_value()
    } else {
        res.kernel_load.raw_value() + 0x200
    };
    let _ = mem
        .read_obj::<u8>(GuestAddress(rip))
        .map_err(|e| BootError::Memory {
            what: "kernel entry",
            detail: e.to_string(),
        })?;
    tracing::info!(
        kernel_load = format_args!("{:#x}", res.kernel_load.raw_value()),
        kernel_end = format_args!("{:#x}", res.kernel_end),
        initrd = format_args!("{:#x}+{:#x}", { params.hdr.ramdisk_image }, {
            params.hdr.ramdisk_size
        }),
        "kernel loaded"
    );
    let _ = ACPI_START;
    Ok(StartMode::Long {
        rip,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_low_ram_reserved_legacy_area_and_high_ram() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let m = e820_map(&ram);
        assert_eq!(m.len(), 3);
        assert_eq!({ m[0].size }, EBDA_START);
        assert_eq!({ m[1].r#type }, E820_RESERVED);
        assert_eq!({ m[2].addr } + { m[2].size }, 64 << 20);
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let e = load(&ram, &spec, None).unwrap_err().to_string();
        assert!(e.contains("kernel /nonexistent/vmlinuz"), "{e}");
    }

    /// An ELF64 vmlinux-like image: one 4 KiB PT_LOAD at 2 MiB (`hlt`s), entry at its start.
    fn tiny_elf() -> Vec<u8> {
        let mut e = vec![0u8; 0x2000];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4..7].copy_from_slice(&[2, 1, 1]); // 64-bit, little endian, version 1
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        e[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        let ph = &mut e[64..120];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&0x20_0000u64.to_le_bytes()); // vaddr
        ph[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // paddr
        ph[32..40].copy_from_slice(&0x1000u64.to_le_bytes()); // filesz
        ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes()); // memsz
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
        e[0x1000..].fill(0xf4);
        e
    }

    /// A huge initrd is refused as too big without being read into memory whole (found while
    /// writing the kernel_load fuzz target: the file was read to its end before the check).
    #[test]
    fn oversized_initrd_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, tiny_elf()).unwrap();
        let i = dir.path().join("initrd");
        // 2 GiB, sparse: reading it whole would allocate 2 GiB.
        std::fs::File::create(&i).unwrap().set_len(2 << 30).unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initrd: Some(i),
            cmdline: "console=ttyS0".into(),
        };
        let t = std::time::Instant::now();
        let e = load(&ram, &spec, None).unwrap_err();
        assert!(
            matches!(e, BootError::InitrdTooBig { size, .. } if size == 2 << 30),
            "{e}"
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
        // A small one still loads, below the end of low RAM.
        std::fs::write(spec.initrd.as_ref().unwrap(), b"initrd").unwrap();
        assert!(load(&ram, &spec, None).is_ok());
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, vec![0x5au8; 8192]).unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: p,
            initrd: None,
            cmdline: String::new(),
        };
        let e = load(&ram, &spec, None).unwrap_err().to_string();
        assert!(e.contains("not a loadable bzImage or ELF"), "{e}");
    }
}
