//! Compiles the eBPF programs in bpf/ with Debian's clang (`-O2 -g -target bpf`;
//! `-g` gives the BTF aya needs for `.maps`). Needs clang and libbpf-dev
//! (`make deps` installs clang-19 and libbpf-dev).

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["pod_fastpath"];

fn clang() -> String {
    if let Ok(c) = std::env::var("FERRY_BPF_CLANG") {
        return c;
    }
    for c in ["clang-19", "clang"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("no clang found to compile the eBPF programs: install clang-19 and libbpf-dev (make deps), or set FERRY_BPF_CLANG");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = clang();
    println!("cargo:rerun-if-env-changed=FERRY_BPF_CLANG");
    for name in PROGRAMS {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let result = Command::new(&clang)
            .args([
                "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3",
            ])
            .args(["-I/usr/include/x86_64-linux-gnu", "-c", &src, "-o"])
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| panic!("running {clang}: {e}"));
        if !result.status.success() {
            panic!(
                "{clang} failed on {src}:\n{}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
    }
}
