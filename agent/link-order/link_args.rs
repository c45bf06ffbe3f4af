// Shared by agent/build.rs and tests/build.rs (`include!`d): link
// arguments that gather the agent's hot functions in one place (see
// agent/link-order/generate.sh for why and how the list is made).
//
// The list holds globs over symbol names; with function sections (rustc's
// default) each function is an input section named `.text.<symbol>`, or
// `.text.unlikely.<symbol>` for one LLVM deems cold. Lines `object:<glob>`
// name assembly objects, whose functions share one `.text`. A
// linker script placed with INSERT leaves the default layout as it is and
// puts the matching sections into `.text.hot`, right before `.text`.
//
// For x86_64 Linux GNU. Both rustc's bundled LLD (its default linker there
// since Rust 1.90) and GNU ld 2.38 or later take the INSERT script and
// `-z pack-relative-relocs`; both were checked. The `object:` lines were
// checked with LLD, which matches them against `<archive>:<member>`; a
// linker that names archive members otherwise leaves those objects where
// they were, costing only their locality. Other targets link as usual. Set `CREDLET_LINK_ORDER=off` to link without either.

/// Writes the linker script for `list` (relative to the package) into
/// OUT_DIR and passes it to the linker for this package's binaries.
fn link_order(list: &str) {
    println!("cargo:rerun-if-changed={list}");
    println!("cargo:rerun-if-env-changed=CREDLET_LINK_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let lld_target = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if !lld_target || var("CREDLET_LINK_ORDER") == "off" {
        return;
    }
    let list_path = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join(list);
    let globs = std::fs::read_to_string(&list_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", list_path.display()));
    // One input section description per group (a "#" line starts one):
    // the groups keep their order; inside a group, sections keep the order
    // of the input.
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    for line in globs.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            groups.push(Vec::new());
            continue;
        }
        assert!(
            line.bytes()
                .all(|b| b.is_ascii_graphic() && !b"(){};\"".contains(&b)),
            "{}: not a symbol glob: {line:?}",
            list_path.display()
        );
        groups.last_mut().expect("one group at least").push(line);
    }
    let mut script = String::from("SECTIONS\n{\n  .text.hot :\n  {\n");
    for group in groups.iter().filter(|g| !g.is_empty()) {
        let (objects, globs): (Vec<&str>, Vec<&str>) =
            group.iter().partition(|line| line.starts_with("object:"));
        if !globs.is_empty() {
            script.push_str("    *(\n");
            for glob in globs {
                // LLVM puts functions it deems cold (those reached only
                // from cold or one-off paths: `main`, argument parsing,
                // start-up) in `.text.unlikely.<symbol>`: start-up code is
                // exactly that.
                for prefix in [".text.", ".text.unlikely."] {
                    script.push_str("      ");
                    script.push_str(prefix);
                    script.push_str(glob);
                    script.push('\n');
                }
            }
            script.push_str("    )\n");
        }
        // Assembly objects have one `.text` for all their functions: an
        // `object:<glob>` line takes the whole `.text` of the object files
        // (archive members included) whose names match.
        for object in objects {
            let name = object.trim_start_matches("object:");
            assert!(
                name.len() > 2 && name.ends_with(".o") && !name.contains('*'),
                "{}: not an object file name: {object:?}",
                list_path.display()
            );
            script.push_str("    *");
            script.push_str(name);
            script.push_str("(.text)\n");
        }
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    let script_path = std::path::Path::new(&var("OUT_DIR")).join("hot-functions.ld");
    std::fs::write(&script_path, script)
        .unwrap_or_else(|e| panic!("write {}: {e}", script_path.display()));
    println!(
        "cargo:rustc-link-arg-bins=-Wl,-T,{}",
        script_path.display()
    );
    // Relative relocations packed as DT_RELR: the loader reads a few KB
    // instead of the 550 KB of .rela.dyn a PIE of this size carries.
    // The binary then needs glibc 2.36 or later, as the one it is linked
    // against here; with an older glibc it is left out.
    if var("HOST") == var("TARGET") && host_glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the build machine's glibc (the one the binary links against)
/// is at least `major.minor`, asked with `getconf GNU_LIBC_VERSION`.
fn host_glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(output) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(have_major), Some(have_minor)) => (have_major, have_minor) >= (major, minor),
        _ => false,
    }
}
