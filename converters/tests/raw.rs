#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;
use imgshift_converters::{ExtentKind, Format, OpenGate, open_path, resolved_extents};
use util::*;

#[test]
fn raw_to_raw_keeps_holes_and_content() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    make_raw(
        &src,
        64 << 20,
        &[(0, 1 << 20), (10 << 20, 3 << 20), ((64 << 20) - 4096, 4096)],
        &[(30 << 20, 4 << 20)],
    );
    let dst = p(d.path(), "dst.raw");
    imgshift_convert(&src, None, &dst, Format::Raw, "");
    assert_same(&src, "raw", &dst, "raw");
    let src_img = open_path(&dst, Some(Format::Raw), &OpenGate::new()).unwrap();
    let map = resolved_extents(src_img.as_ref(), 0, 64 << 20).unwrap();
    // the explicit zeros became a hole
    assert!(
        map.bytes(ExtentKind::Data) <= (5 << 20) + 4096 * 4,
        "{map:?}"
    );
}
