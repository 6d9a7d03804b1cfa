//! The committed C header is exactly what cbindgen generates from the
//! source: CI fails when someone changes the ABI and forgets the header.
//! `PRESENCE_BLESS=1 cargo test -p presence-ffi --test header` rewrites it.

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("ffi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = format!("{dir}/include/presence.h");
    if std::env::var_os("PRESENCE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/presence.h differs from what cbindgen generates from ffi/src: run \
         `PRESENCE_BLESS=1 cargo test -p presence-ffi --test header` and commit the header"
    );
}
