//! WGSL for the GEMV kernels, generated from one template.
//!
//! A kernel is four parts: a prelude (bindings, byte readers), a *unit decoder* for the weight
//! type (`unit_dot`: decodes a few values of one block straight from the file's bytes and
//! multiplies them into the per-token accumulators), a GEMV body (plain: x read from the
//! storage buffer; tiled: x staged through workgroup memory 256 columns at a time), and a
//! reduction (subgroup adds, or a shared-memory tree where the adapter has no subgroups).
//!
//! Weights are bound twice, as `array<u32>` and `array<vec4<u32>>`, over the same bytes:
//! 16-byte-aligned units (F32, F16, Q4_K, Q5_K) load a whole `vec4` at once; blocks whose size
//! is not a multiple of 4 (Q8_0's 34 bytes, Q4_0's 18, Q5_0's 22, Q6_K's 210) are read with
//! `w32`, which joins two words at any byte offset.
//!
//! A row is cut into *units* (a unit is the slice of a block one invocation decodes: 8 to 32
//! values); consecutive invocations take consecutive units, so a subgroup's loads of a row are
//! contiguous.

use quarry_format::GgmlType;

/// Columns of x staged in workgroup memory per step of the tiled kernel (a multiple of every
/// block size).
pub(crate) const TILE: u32 = 256;

/// How one weight type is cut into units and decoded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Values per block (for F32/F16: per unit-sized group).
    pub vals_per_block: u32,
    /// Bytes per block.
    pub block_bytes: u32,
    /// Units per block.
    pub units_per_block: u32,
    /// x is read four values at a time (`array<vec4<f32>>`): every quantized type, and F32/F16
    /// rows whose length allows it.
    pub vec: bool,
    body: &'static str,
}

/// The layout for `dtype` with rows of `cols` values, or `None` for a type with no kernel.
pub(crate) fn layout(dtype: GgmlType, cols: usize) -> Option<Layout> {
    let l = |vals_per_block, block_bytes, units_per_block, vec, body| Layout {
        vals_per_block,
        block_bytes,
        units_per_block,
        vec,
        body,
    };
    Some(match dtype {
        GgmlType::F32 if cols.is_multiple_of(4) => l(4, 16, 1, true, F32_VEC),
        GgmlType::F32 => l(1, 4, 1, false, F32_SCALAR),
        GgmlType::F16 if cols.is_multiple_of(8) => l(8, 16, 1, true, F16_VEC),
        GgmlType::F16 => l(1, 2, 1, false, F16_SCALAR),
        GgmlType::Q8_0 => l(32, 34, 4, true, Q8_0),
        GgmlType::Q4_0 => l(32, 18, 4, true, Q4_0),
        GgmlType::Q4_1 => l(32, 20, 4, true, Q4_1),
        GgmlType::Q5_0 => l(32, 22, 4, true, Q5_0),
        GgmlType::Q4_K => l(256, 144, 8, true, Q4_K),
        GgmlType::Q5_K => l(256, 176, 8, true, Q5_K),
        GgmlType::Q6_K => l(256, 210, 8, true, Q6_K),
        _ => return None,
    })
}

/// The weight types with a GEMV kernel.
pub const SUPPORTED: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Everything that selects one compiled kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ShaderKey {
    pub dtype: GgmlType,
    pub vec: bool,
    pub tokens: u32,
    pub workgroup_size: u32,
    pub rows_per_workgroup: u32,
    pub tiled: bool,
    pub subgroups: bool,
}

/// Bytes of workgroup memory the kernel for `key` declares.
pub(crate) fn workgroup_bytes(key: &ShaderKey) -> u32 {
    let red = key.rows_per_workgroup * key.tokens * key.workgroup_size * 4;
    let tile = if key.tiled { key.tokens * TILE * 4 } else { 0 };
    red + tile
}

/// The WGSL source of the kernel for `key`.
pub(crate) fn source(key: &ShaderKey, layout: &Layout) -> String {
    let mut s = String::with_capacity(8192);
    let xelem = if layout.vec { "vec4<f32>" } else { "f32" };
    s.push_str(&format!(
        "const WG: u32 = {}u;\nconst ROWS: u32 = {}u;\nconst T: u32 = {}u;\n\
         const K: u32 = ROWS * T;\nconst VPB: u32 = {}u;\nconst BB: u32 = {}u;\n\
         const UPB: u32 = {}u;\nconst TILE: u32 = {TILE}u;\n",
        key.workgroup_size,
        key.rows_per_workgroup,
        key.tokens,
        layout.vals_per_block,
        layout.block_bytes,
        layout.units_per_block,
    ));
    s.push_str(&PRELUDE.replace("XELEM", xelem));
    s.push_str(match (key.tiled, layout.vec) {
        (false, true) => X_PLAIN_VEC,
        (false, false) => X_PLAIN_SCALAR,
        (true, true) => X_TILED_VEC,
        (true, false) => X_TILED_SCALAR,
    });
    s.push_str(layout.body);
    let args = if key.subgroups {
        ", @builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_id) sg_id: u32, \
         @builtin(num_subgroups) n_sg: u32"
    } else {
        ""
    };
    let body = if key.tiled { BODY_TILED } else { BODY_PLAIN };
    let reduce = if key.subgroups {
        REDUCE_SUBGROUP
    } else {
        REDUCE_SHARED
    };
    s.push_str(
        &body
            .replace("SUBGROUP_ARGS", args)
            .replace("REDUCE", reduce),
    );
    s
}

const PRELUDE: &str = r#"
struct Params {
    rows: u32, cols: u32, row_bytes: u32, units: u32,
    w_off: u32, x_off: u32, x_stride: u32, y_off: u32,
    y_stride: u32, groups_x: u32, pad0: u32, pad1: u32,
}
@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> W4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<XELEM>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

var<workgroup> RED: array<f32, K * WG>;
// Accumulators of this invocation: [row of the workgroup][token].
var<private> part: array<f32, K>;

// Four bytes at any byte offset.
fn w32(off: u32) -> u32 {
    let i = off >> 2u;
    let s = (off & 3u) * 8u;
    if (s == 0u) { return W[i]; }
    return (W[i] >> s) | (W[i + 1u] << (32u - s));
}
// Two bytes at an even offset.
fn w16(off: u32) -> u32 { return (W[off >> 2u] >> ((off & 2u) * 8u)) & 0xFFFFu; }
fn f16at(off: u32) -> f32 { return unpack2x16float(w16(off)).x; }
fn wbyte(off: u32) -> u32 { return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xFFu; }
fn sext8(b: u32) -> i32 { return bitcast<i32>(b << 24u) >> 24u; }
// The four bytes of a word, least significant first.
fn bytes4(w: u32) -> vec4<u32> { return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u); }
fn nib_lo(w: u32) -> vec4<f32> { return vec4<f32>(bytes4(w) & vec4<u32>(15u)); }
fn nib_hi(w: u32) -> vec4<f32> { return vec4<f32>(bytes4(w) >> vec4<u32>(4u)); }
fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}
// Byte k of the 12 scale bytes shared by Q4_K and Q5_K.
fn sb(s: vec3<u32>, k: u32) -> u32 { return (s[k >> 2u] >> ((k & 3u) * 8u)) & 0xFFu; }
// Scale and min of sub-block j (0..8) of a Q4_K/Q5_K super-block.
fn k4_scale_min(s: vec3<u32>, j: u32) -> vec2<f32> {
    if (j < 4u) { return vec2<f32>(f32(sb(s, j) & 63u), f32(sb(s, j + 4u) & 63u)); }
    let sc = (sb(s, j + 4u) & 15u) | ((sb(s, j - 4u) >> 6u) << 4u);
    let m = (sb(s, j + 4u) >> 4u) | ((sb(s, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
"#;

// x access: `i` is the column (plain) or the column within the staged tile (tiled).
const X_PLAIN_VEC: &str = r#"
fn dot4(pb: u32, v: vec4<f32>, i: u32) {
    for (var t = 0u; t < T; t++) { part[pb + t] += dot(v, X[(P.x_off + t * P.x_stride + i) >> 2u]); }
}
"#;

const X_PLAIN_SCALAR: &str = r#"
fn dot1(pb: u32, v: f32, i: u32) {
    for (var t = 0u; t < T; t++) { part[pb + t] += v * X[P.x_off + t * P.x_stride + i]; }
}
"#;

const X_TILED_VEC: &str = r#"
var<workgroup> XS: array<vec4<f32>, T * TILE / 4u>;
fn dot4(pb: u32, v: vec4<f32>, i: u32) {
    for (var t = 0u; t < T; t++) { part[pb + t] += dot(v, XS[(t * TILE + i) >> 2u]); }
}
fn load_tile(lid: u32, tile0: u32) {
    for (var i = lid; i < T * (TILE / 4u); i += WG) {
        let t = i / (TILE / 4u);
        let c = tile0 + 4u * (i % (TILE / 4u));
        var v = vec4<f32>(0.0);
        if (c < P.cols) { v = X[(P.x_off + t * P.x_stride + c) >> 2u]; }
        XS[i] = v;
    }
}
"#;

const X_TILED_SCALAR: &str = r#"
var<workgroup> XS: array<f32, T * TILE>;
fn dot1(pb: u32, v: f32, i: u32) {
    for (var t = 0u; t < T; t++) { part[pb + t] += v * XS[t * TILE + i]; }
}
fn load_tile(lid: u32, tile0: u32) {
    for (var i = lid; i < T * TILE; i += WG) {
        let t = i / TILE;
        let c = tile0 + i % TILE;
        var v = 0.0;
        if (c < P.cols) { v = X[P.x_off + t * P.x_stride + c]; }
        XS[i] = v;
    }
}
"#;

// unit_dot(pb, wb, u, xb): adds unit `u` of the block at byte `wb` times x (the block's first
// column is `xb`) into part[pb..pb + T]. Each mirrors quarry-kernels' scalar dequantization.

const F32_VEC: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    dot4(pb, bitcast<vec4<f32>>(W4[wb >> 4u]), xb);
}
"#;

const F32_SCALAR: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    dot1(pb, bitcast<f32>(W[wb >> 2u]), xb);
}
"#;

const F16_VEC: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let q = W4[wb >> 4u];
    dot4(pb, vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), xb);
    dot4(pb, vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)), xb + 4u);
}
"#;

const F16_SCALAR: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    dot1(pb, f16at(wb), xb);
}
"#;

// Q8_0: f16 d, 32 i8. Unit u: values 8u..8u+8.
const Q8_0: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let d = f16at(wb);
    let o = wb + 2u + 8u * u;
    dot4(pb, d * i8x4(w32(o)), xb + 8u * u);
    dot4(pb, d * i8x4(w32(o + 4u)), xb + 8u * u + 4u);
}
"#;

// Q4_0: f16 d, 16 bytes; byte j's low nibble is value j, its high nibble value j + 16.
// Unit u: bytes 4u..4u+4.
const Q4_0: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let d = f16at(wb);
    let q = w32(wb + 2u + 4u * u);
    dot4(pb, d * (nib_lo(q) - 8.0), xb + 4u * u);
    dot4(pb, d * (nib_hi(q) - 8.0), xb + 16u + 4u * u);
}
"#;

// Q4_1: f16 d, f16 m, nibbles as Q4_0; value = q * d + m.
const Q4_1: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let dm = unpack2x16float(W[wb >> 2u]);
    let q = W[(wb >> 2u) + 1u + u];
    dot4(pb, dm.x * nib_lo(q) + dm.y, xb + 4u * u);
    dot4(pb, dm.x * nib_hi(q) + dm.y, xb + 16u + 4u * u);
}
"#;

// Q5_0: f16 d, u32 qh (bit j: fifth bit of value j), nibbles as Q4_0; value = (q - 16) * d.
const Q5_0: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let d = f16at(wb);
    let qh = vec4<u32>(w32(wb + 2u));
    let q = w32(wb + 6u + 4u * u);
    let sh = vec4<u32>(0u, 1u, 2u, 3u) + 4u * u;
    let hlo = vec4<f32>(((qh >> sh) & vec4<u32>(1u)) << vec4<u32>(4u));
    let hhi = vec4<f32>(((qh >> (sh + vec4<u32>(16u))) & vec4<u32>(1u)) << vec4<u32>(4u));
    dot4(pb, d * (nib_lo(q) + hlo - 16.0), xb + 4u * u);
    dot4(pb, d * (nib_hi(q) + hhi - 16.0), xb + 16u + 4u * u);
}
"#;

// Q4_K: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes; 64 values per 32 bytes (low
// nibbles sub-block 2c, high 2c + 1). Unit u: chunk c = u / 2, bytes 16 * (u % 2) of it.
const Q4_K: &str = r#"
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let c = u >> 1u;
    let hf = u & 1u;
    let w = wb >> 2u;
    let dm = unpack2x16float(W[w]);
    let s = vec3<u32>(W[w + 1u], W[w + 2u], W[w + 3u]);
    let sm1 = k4_scale_min(s, 2u * c);
    let sm2 = k4_scale_min(s, 2u * c + 1u);
    let d1 = dm.x * sm1.x;
    let m1 = dm.y * sm1.y;
    let d2 = dm.x * sm2.x;
    let m2 = dm.y * sm2.y;
    let q = W4[(wb + 16u + 32u * c + 16u * hf) >> 4u];
    let x0 = xb + 64u * c + 16u * hf;
    dot4(pb, d1 * nib_lo(q.x) - m1, x0);
    dot4(pb, d1 * nib_lo(q.y) - m1, x0 + 4u);
    dot4(pb, d1 * nib_lo(q.z) - m1, x0 + 8u);
    dot4(pb, d1 * nib_lo(q.w) - m1, x0 + 12u);
    dot4(pb, d2 * nib_hi(q.x) - m2, x0 + 32u);
    dot4(pb, d2 * nib_hi(q.y) - m2, x0 + 36u);
    dot4(pb, d2 * nib_hi(q.z) - m2, x0 + 40u);
    dot4(pb, d2 * nib_hi(q.w) - m2, x0 + 44u);
}
"#;

// Q5_K: Q4_K with 32 bytes qh before the nibbles; bit s of qh[l] is the fifth bit of
// sub-block s's value l.
const Q5_K: &str = r#"
fn q5k_half(pb: u32, q: u32, h: u32, c: u32, d1: f32, m1: f32, d2: f32, m2: f32, x0: u32) {
    let hb = bytes4(h);
    let h1 = vec4<f32>(((hb >> vec4<u32>(2u * c)) & vec4<u32>(1u)) << vec4<u32>(4u));
    let h2 = vec4<f32>(((hb >> vec4<u32>(2u * c + 1u)) & vec4<u32>(1u)) << vec4<u32>(4u));
    dot4(pb, d1 * (nib_lo(q) + h1) - m1, x0);
    dot4(pb, d2 * (nib_hi(q) + h2) - m2, x0 + 32u);
}
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let c = u >> 1u;
    let hf = u & 1u;
    let w = wb >> 2u;
    let dm = unpack2x16float(W[w]);
    let s = vec3<u32>(W[w + 1u], W[w + 2u], W[w + 3u]);
    let sm1 = k4_scale_min(s, 2u * c);
    let sm2 = k4_scale_min(s, 2u * c + 1u);
    let d1 = dm.x * sm1.x;
    let m1 = dm.y * sm1.y;
    let d2 = dm.x * sm2.x;
    let m2 = dm.y * sm2.y;
    let qh = W4[(wb + 16u + 16u * hf) >> 4u];
    let q = W4[(wb + 48u + 32u * c + 16u * hf) >> 4u];
    let x0 = xb + 64u * c + 16u * hf;
    q5k_half(pb, q.x, qh.x, c, d1, m1, d2, m2, x0);
    q5k_half(pb, q.y, qh.y, c, d1, m1, d2, m2, x0 + 4u);
    q5k_half(pb, q.z, qh.z, c, d1, m1, d2, m2, x0 + 8u);
    q5k_half(pb, q.w, qh.w, c, d1, m1, d2, m2, x0 + 12u);
}
"#;

// Q6_K: 128 bytes ql, 64 bytes qh, 16 i8 scales, f16 d. Per 128-value half h: ql[l] low/high
// nibbles are values l and l + 64, ql[l + 32] values l + 32 and l + 96; qh[l] bit pairs top
// values l, l + 32, l + 64, l + 96. Unit u: half u / 4, l in 8 * (u % 4)..+8.
const Q6_K: &str = r#"
fn q6k_word(pb: u32, wb: u32, h: u32, l0: u32, s: vec4<f32>, xb: u32) {
    let a = bytes4(w32(wb + 64u * h + l0));
    let b = bytes4(w32(wb + 64u * h + 32u + l0));
    let hv = bytes4(w32(wb + 128u + 32u * h + l0));
    let three = vec4<u32>(3u);
    let four = vec4<u32>(4u);
    let q1 = vec4<f32>((a & vec4<u32>(15u)) | ((hv & three) << four)) - 32.0;
    let q2 = vec4<f32>((b & vec4<u32>(15u)) | (((hv >> vec4<u32>(2u)) & three) << four)) - 32.0;
    let q3 = vec4<f32>((a >> four) | (((hv >> four) & three) << four)) - 32.0;
    let q4 = vec4<f32>((b >> four) | (((hv >> vec4<u32>(6u)) & three) << four)) - 32.0;
    let x0 = xb + 128u * h + l0;
    dot4(pb, s.x * q1, x0);
    dot4(pb, s.y * q2, x0 + 32u);
    dot4(pb, s.z * q3, x0 + 64u);
    dot4(pb, s.w * q4, x0 + 96u);
}
fn unit_dot(pb: u32, wb: u32, u: u32, xb: u32) {
    let h = u >> 2u;
    let g = u & 3u;
    let d = f16at(wb + 208u);
    let so = wb + 192u + 8u * h + (g >> 1u);
    let s = d * vec4<f32>(f32(sext8(wbyte(so))), f32(sext8(wbyte(so + 2u))),
                          f32(sext8(wbyte(so + 4u))), f32(sext8(wbyte(so + 6u))));
    q6k_word(pb, wb, h, 8u * g, s, xb);
    q6k_word(pb, wb, h, 8u * g + 4u, s, xb);
}
"#;

const BODY_PLAIN: &str = r#"
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>SUBGROUP_ARGS) {
    let row0 = (wid.y * P.groups_x + wid.x) * ROWS;
    for (var k = 0u; k < K; k++) { part[k] = 0.0; }
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + r;
        if (row < P.rows) {
            let rb = P.w_off + row * P.row_bytes;
            for (var u = lid; u < P.units; u += WG) {
                let blk = u / UPB;
                unit_dot(r * T, rb + blk * BB, u - blk * UPB, blk * VPB);
            }
        }
    }
    REDUCE
}
"#;

const BODY_TILED: &str = r#"
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>SUBGROUP_ARGS) {
    let row0 = (wid.y * P.groups_x + wid.x) * ROWS;
    for (var k = 0u; k < K; k++) { part[k] = 0.0; }
    let units_per_tile = (TILE / VPB) * UPB;
    for (var tile0 = 0u; tile0 < P.cols; tile0 += TILE) {
        workgroupBarrier();
        load_tile(lid, tile0);
        workgroupBarrier();
        let ubeg = (tile0 / VPB) * UPB;
        let uend = min(ubeg + units_per_tile, P.units);
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < P.rows) {
                let rb = P.w_off + row * P.row_bytes;
                for (var u = ubeg + lid; u < uend; u += WG) {
                    let blk = u / UPB;
                    unit_dot(r * T, rb + blk * BB, u - blk * UPB, blk * VPB - tile0);
                }
            }
        }
    }
    REDUCE
}
"#;

// Shared-memory tree: WG partial sums per accumulator, halved log2(WG) times.
const REDUCE_SHARED: &str = r#"
    for (var k = 0u; k < K; k++) { RED[k * WG + lid] = part[k]; }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var k = 0u; k < K; k++) { RED[k * WG + lid] += RED[k * WG + lid + s]; }
        }
        workgroupBarrier();
    }
    if (lid < K) {
        let row = row0 + lid / T;
        if (row < P.rows) { Y[P.y_off + (lid % T) * P.y_stride + row] = RED[lid * WG]; }
    }
"#;

// Subgroup adds, then one partial per subgroup summed through shared memory.
const REDUCE_SUBGROUP: &str = r#"
    for (var k = 0u; k < K; k++) {
        let s = subgroupAdd(part[k]);
        if (sg_lane == 0u) { RED[k * WG + sg_id] = s; }
    }
    workgroupBarrier();
    if (lid < K) {
        let row = row0 + lid / T;
        if (row < P.rows) {
            var acc = 0.0;
            for (var j = 0u; j < n_sg; j++) { acc += RED[lid * WG + j]; }
            Y[P.y_off + (lid % T) * P.y_stride + row] = acc;
        }
    }
"#;
