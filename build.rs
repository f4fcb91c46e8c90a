//! Build script of `ffi/` (named by `ffi/Cargo.toml`, since the workspace root
//! is virtual). With the `dpdk` feature it finds the system's DPDK through
//! pkg-config, generates bindings for the calls Pollen uses with bindgen, and
//! compiles the C shims in `native/` that reach DPDK's static-inline
//! functions. Without the feature it does nothing.

fn main() {
    println!("cargo:rerun-if-changed=../build.rs");
    #[cfg(feature = "dpdk")]
    dpdk::build();
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::path::PathBuf;

    /// The DPDK release whose API the shims and wrappers are written against
    /// (Debian 12's `libdpdk-dev`).
    const MIN_VERSION: &str = "22.11";

    pub fn build() {
        let native =
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../native");
        println!("cargo:rerun-if-changed={}", native.join("shim.h").display());
        println!("cargo:rerun-if-changed={}", native.join("shim.c").display());
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

        let lib = match pkg_config::Config::new().atleast_version(MIN_VERSION).probe("libdpdk") {
            Ok(lib) => lib,
            Err(e) => {
                eprintln!(
                    "\nerror: the `dpdk` feature needs DPDK {MIN_VERSION} or later, found through pkg-config as `libdpdk`.\n\
                     Install it: `apt-get install libdpdk-dev pkg-config libclang-dev` (Debian/Ubuntu), \
                     `dnf install dpdk-devel pkgconf libclang-devel` (Fedora),\n\
                     or point PKG_CONFIG_PATH at a DPDK install. Build without `--features dpdk` to use the kernel transports only.\n\
                     pkg-config said: {e}\n"
                );
                std::process::exit(1);
            }
        };

        // DPDK's headers need its compile flags (`-include rte_config.h`,
        // `-march=...`), which pkg-config gives as cflags.
        let cflags = pkg_config::get_variable("libdpdk", "cflags").ok();
        let mut clang_args: Vec<String> =
            lib.include_paths.iter().map(|p| format!("-I{}", p.display())).collect();
        let extra = std::process::Command::new("pkg-config")
            .args(["--cflags-only-other", "libdpdk"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .or(cflags)
            .unwrap_or_default();
        let mut words = extra.split_whitespace();
        while let Some(w) = words.next() {
            if w == "-include" {
                if let Some(f) = words.next() {
                    clang_args.push("-include".into());
                    clang_args.push(f.into());
                }
            } else if w.starts_with("-m") || w.starts_with("-D") {
                clang_args.push(w.into());
            }
        }

        let mut cc = cc::Build::new();
        cc.file(native.join("shim.c")).include(&native).warnings(true).opt_level(2);
        for a in &clang_args {
            cc.flag(a);
        }
        cc.compile("pollen_dpdk_shim");

        let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
        let bindings = bindgen::Builder::default()
            .header(native.join("shim.h").display().to_string())
            .clang_args(&clang_args)
            .clang_arg(format!("-I{}", native.display()))
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            // Only what Pollen calls is bound.
            .allowlist_function("pollen_.*")
            .allowlist_function("rte_eal_init")
            .allowlist_function("rte_eal_cleanup")
            .allowlist_function("rte_thread_register")
            .allowlist_function("rte_thread_unregister")
            .allowlist_function("rte_strerror")
            .allowlist_function("rte_socket_id")
            .allowlist_function("rte_pktmbuf_pool_create")
            .allowlist_function("rte_mempool_free")
            .allowlist_function("rte_mempool_avail_count")
            .allowlist_function("rte_mempool_in_use_count")
            .allowlist_function("rte_eth_dev_count_avail")
            .allowlist_function("rte_eth_dev_is_valid_port")
            .allowlist_function("rte_eth_dev_socket_id")
            .allowlist_function("rte_eth_dev_info_get")
            .allowlist_function("rte_eth_macaddr_get")
            .allowlist_function("rte_eth_dev_start")
            .allowlist_function("rte_eth_dev_stop")
            .allowlist_function("rte_eth_rx_queue_setup")
            .allowlist_function("rte_eth_tx_queue_setup")
            .allowlist_function("rte_eth_tx_done_cleanup")
            .allowlist_function("rte_eth_dev_set_mtu")
            .allowlist_function("rte_eth_link_get_nowait")
            .allowlist_function("rte_eth_stats_get")
            .allowlist_var("RTE_MBUF_DEFAULT_BUF_SIZE")
            .allowlist_var("RTE_PKTMBUF_HEADROOM")
            // The mbuf and mempool are handled through shims only.
            .opaque_type("rte_mbuf")
            .opaque_type("rte_mempool")
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .generate()
            .unwrap_or_else(|e| {
                eprintln!("\nerror: bindgen could not read DPDK's headers: {e}\nIt needs libclang: `apt-get install libclang-dev`.\n");
                std::process::exit(1);
            });
        bindings.write_to_file(out.join("dpdk.rs")).expect("write DPDK bindings");
    }
}
