//! WGSL for the GEMV kernels, generated from one template, and for the prompt GEMM, which
//! reuses its unit decoders ([`gemm_source`]).
//!
//! A kernel is four parts: a prelude (bindings, byte readers), a *unit decoder* for the weight
//! type (`decode`: a few values of one block, decoded straight from the file's bytes into
//! registers, and `xbase`: the column of the unit's first value), a GEMV body (plain: x read
//! from the storage buffer; tiled: x staged through workgroup memory 256 columns at a time),
//! and a reduction (subgroup adds, or a shared-memory tree where the adapter has no
//! subgroups).
//!
//! The body is generated with its loops over the workgroup's rows, the tokens and the unit's
//! values unrolled here, so every accumulator and decoded value has a constant index (they
//! stay in registers), and each x value loaded is used for every row of the workgroup.
//!
//! Weights are bound twice, as `array<u32>` and `array<vec4<u32>>`, over the same bytes:
//! 16-byte-aligned units (F32, F16, Q4_K, Q5_K) load a whole `vec4` at once; blocks whose size
//! is not a multiple of 4 (Q8_0's 34 bytes, Q4_0's 18, Q5_0's 22, Q6_K's 210) are read with
//! `w32`, which joins two words at any byte offset.
//!
//! A row is cut into *units* (the slice of a block one invocation decodes: 4 to 32 values);
//! consecutive invocations take consecutive units, so a subgroup's loads of a row are
//! contiguous.

use std::fmt::Write;

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
    /// Columns that a run of consecutive units, starting at a multiple of the run, covers
    /// exactly (the GEMM's column steps are multiples of it).
    pub span: u32,
    /// Column offsets, from `xbase(u)`, of the unit's decoded values (vec4s or scalars).
    offsets: &'static [u32],
    /// WGSL `xbase` and `decode` for this type.
    body: &'static str,
}

/// The layout for `dtype` with rows of `cols` values, or `None` for a type with no kernel.
pub(crate) fn layout(dtype: GgmlType, cols: usize) -> Option<Layout> {
    let l = |vals_per_block, block_bytes, units_per_block, vec, span, offsets, body| Layout {
        vals_per_block,
        block_bytes,
        units_per_block,
        vec,
        span,
        offsets,
        body,
    };
    const K_OFFS: &[u32] = &[0, 4, 8, 12, 32, 36, 40, 44];
    const Q6_OFFS: &[u32] = &[0, 32, 64, 96, 4, 36, 68, 100];
    Some(match dtype {
        GgmlType::F32 if cols.is_multiple_of(4) => l(4, 16, 1, true, 4, &[0], F32_VEC),
        GgmlType::F32 => l(1, 4, 1, false, 1, &[0], F32_SCALAR),
        GgmlType::F16 if cols.is_multiple_of(8) => l(8, 16, 1, true, 8, &[0, 4], F16_VEC),
        GgmlType::F16 => l(1, 2, 1, false, 1, &[0], F16_SCALAR),
        GgmlType::Q8_0 => l(32, 34, 2, true, 16, &[0, 4, 8, 12], Q8_0),
        GgmlType::Q4_0 => l(32, 18, 2, true, 32, &[0, 4, 16, 20], Q4_0),
        GgmlType::Q4_1 => l(32, 20, 2, true, 32, &[0, 4, 16, 20], Q4_1),
        GgmlType::Q5_0 => l(32, 22, 2, true, 32, &[0, 4, 16, 20], Q5_0),
        GgmlType::Q4_K => l(256, 144, 8, true, 64, K_OFFS, Q4_K),
        GgmlType::Q5_K => l(256, 176, 8, true, 64, K_OFFS, Q5_K),
        GgmlType::Q6_K => l(256, 210, 8, true, 128, Q6_OFFS, Q6_K),
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
    /// The prompt GEMM ([`gemm_source`]); the fields above it but `dtype` and `vec` are then
    /// the GEMM's constants.
    pub gemm: bool,
}

/// Bytes of workgroup memory the kernel for `key` declares.
pub(crate) fn workgroup_bytes(key: &ShaderKey) -> u32 {
    let red = key.rows_per_workgroup * key.tokens * key.workgroup_size * 4;
    let tile = if key.tiled { key.tokens * TILE * 4 } else { 0 };
    red + tile
}

/// The WGSL source of the kernel for `key`.
pub(crate) fn source(key: &ShaderKey, layout: &Layout) -> String {
    let mut s = String::with_capacity(16384);
    let (vt, mul) = if layout.vec {
        ("vec4<f32>", "dot")
    } else {
        ("f32", "mul1")
    };
    let nv = layout.offsets.len();
    let (rows, tokens) = (key.rows_per_workgroup, key.tokens);
    // Infallible: writing to a String.
    let _ = writeln!(
        s,
        "const WG: u32 = {}u;\nconst ROWS: u32 = {rows}u;\nconst T: u32 = {tokens}u;\n\
         const K: u32 = ROWS * T;\nconst VPB: u32 = {}u;\nconst BB: u32 = {}u;\n\
         const UPB: u32 = {}u;\nconst TILE: u32 = {TILE}u;\nconst NV: u32 = {nv}u;\n\
         alias VT = {vt};",
        key.workgroup_size, layout.vals_per_block, layout.block_bytes, layout.units_per_block,
    );
    s.push_str(&PRELUDE.replace("XELEM", vt));
    s.push_str("var<workgroup> RED: array<f32, K * WG>;\n");
    if key.tiled {
        let _ = writeln!(
            s,
            "var<workgroup> XS: array<VT, T * TILE / {}u>;",
            if layout.vec { 4 } else { 1 }
        );
        s.push_str(if layout.vec {
            LOAD_TILE_VEC
        } else {
            LOAD_TILE_SCALAR
        });
    }
    s.push_str(layout.body);

    // x value `t` at column expression `col`.
    let x_at = |t: u32, col: &str| -> String {
        let shift = if layout.vec { " >> 2u" } else { "" };
        if key.tiled {
            format!("XS[({t}u * TILE + {col}){shift}]")
        } else {
            format!("X[(P.x_off + {t}u * P.x_stride + {col}){shift}]")
        }
    };
    // One unit of every row of the workgroup, times every token.
    let mut unit = String::new();
    let _ = writeln!(
        unit,
        "        let blk = u / UPB;\n        let ub = u - blk * UPB;"
    );
    let xb = if key.tiled {
        "blk * VPB + xbase(ub) - tile0"
    } else {
        "blk * VPB + xbase(ub)"
    };
    let _ = writeln!(unit, "        let xb = {xb};");
    if tokens == 1 {
        // One token: x once, then each row decoded and used in turn (registers: one unit of x
        // and one row's values, however many rows), so more rows cost no x traffic.
        for (i, off) in layout.offsets.iter().enumerate() {
            let _ = writeln!(
                unit,
                "        let x{i} = {};",
                x_at(0, &format!("xb + {off}u"))
            );
        }
        for r in 0..rows {
            let terms: Vec<String> = (0..nv).map(|i| format!("{mul}(w{r}[{i}], x{i})")).collect();
            let _ = writeln!(
                unit,
                "        {{\n            let w{r} = decode(rb{r} + blk * BB, ub);\n            acc[{r}] += {};\n        }}",
                terms.join(" + ")
            );
        }
    } else {
        // Several tokens: every row's values decoded once, then each token's x used for all.
        for r in 0..rows {
            let _ = writeln!(unit, "        let w{r} = decode(rb{r} + blk * BB, ub);");
        }
    }
    for t in (0..tokens).filter(|_| tokens > 1) {
        unit.push_str("        {\n");
        for (i, off) in layout.offsets.iter().enumerate() {
            let _ = writeln!(
                unit,
                "            let x{i} = {};",
                x_at(t, &format!("xb + {off}u"))
            );
        }
        for r in 0..rows {
            let terms: Vec<String> = (0..nv).map(|i| format!("{mul}(w{r}[{i}], x{i})")).collect();
            let _ = writeln!(
                unit,
                "            acc[{}] += {};",
                r * tokens + t,
                terms.join(" + ")
            );
        }
        unit.push_str("        }\n");
    }

    let args = if key.subgroups {
        ", @builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_id) sg_id: u32, \
         @builtin(num_subgroups) n_sg: u32"
    } else {
        ""
    };
    let _ = writeln!(
        s,
        "@compute @workgroup_size(WG)\nfn main(@builtin(local_invocation_index) lid: u32, \
         @builtin(workgroup_id) wid: vec3<u32>{args}) {{\n    \
         let row0 = (wid.y * P.groups_x + wid.x) * ROWS;\n    var acc: array<f32, K>;"
    );
    // Rows past the end repeat the last row (valid addresses); their sums are not written.
    for r in 0..rows {
        let _ = writeln!(
            s,
            "    let rb{r} = P.w_off + min(row0 + {r}u, P.rows - 1u) * P.row_bytes;"
        );
    }
    if key.tiled {
        let _ = writeln!(
            s,
            "    for (var tile0 = 0u; tile0 < P.cols; tile0 += TILE) {{\n        \
             workgroupBarrier();\n        load_tile(lid, tile0);\n        workgroupBarrier();\n        \
             let ubeg = (tile0 / VPB) * UPB;\n        \
             let uend = min(ubeg + (TILE / VPB) * UPB, P.units);\n        \
             for (var u = ubeg + lid; u < uend; u += WG) {{\n{unit}        }}\n    }}"
        );
    } else {
        let _ = writeln!(
            s,
            "    for (var u = lid; u < P.units; u += WG) {{\n{unit}    }}"
        );
    }
    let k = rows * tokens;
    if key.subgroups {
        for k in 0..k {
            let _ = writeln!(
                s,
                "    {{ let v = subgroupAdd(acc[{k}]); if (sg_lane == 0u) {{ RED[{k}u * WG + sg_id] = v; }} }}"
            );
        }
        s.push_str(REDUCE_SUBGROUP_END);
    } else {
        for k in 0..k {
            let _ = writeln!(s, "    RED[{k}u * WG + lid] = acc[{k}];");
        }
        s.push_str("    workgroupBarrier();\n    for (var s = WG / 2u; s > 0u; s >>= 1u) {\n        if (lid < s) {\n");
        for k in 0..k {
            let _ = writeln!(
                s,
                "            RED[{k}u * WG + lid] += RED[{k}u * WG + lid + s];"
            );
        }
        s.push_str("        }\n        workgroupBarrier();\n    }\n");
        s.push_str(REDUCE_SHARED_END);
    }
    s.push_str("}\n");
    s
}

/// Rows and tokens of one GEMM workgroup's output tile; 64 invocations as 8 × 8, each
/// summing 4 rows × 4 tokens in registers.
pub(crate) const GEMM_ROWS: u32 = 32;
pub(crate) const GEMM_TOKENS: u32 = 32;
pub(crate) const GEMM_WG: u32 = 64;

/// Columns of one GEMM step for `layout`: whole runs of units, at least 32.
pub(crate) fn gemm_step(layout: &Layout) -> u32 {
    layout.span.max(32)
}

/// Bytes of workgroup memory the GEMM for `layout` declares: one step of the tile's weights
/// (decoded to f32) and of its tokens' x.
pub(crate) fn gemm_workgroup_bytes(layout: &Layout) -> u32 {
    (GEMM_ROWS + GEMM_TOKENS) * gemm_step(layout) * 4
}

/// The WGSL of the prompt GEMM for `layout` (a `vec` layout): `Y = W·Xᵀ` for up to
/// [`GEMM_TOKENS`] tokens per workgroup in z, [`GEMM_ROWS`] rows per workgroup in x/y.
///
/// Each step decodes the tile's weights once into workgroup memory (every invocation a few
/// units, with the GEMV's `decode`) and stages the tokens' x beside them; every decoded value
/// then serves 32 tokens, where the GEMV's serves 8. Rows past the end repeat the last row
/// and tokens past the end read zeros; neither is written.
pub(crate) fn gemm_source(layout: &Layout) -> String {
    let kc = gemm_step(layout);
    let vpu = layout.vals_per_block / layout.units_per_block;
    let mut s = String::with_capacity(16384);
    let _ = writeln!(
        s,
        "const VPB: u32 = {}u;\nconst BB: u32 = {}u;\nconst UPB: u32 = {}u;\n\
         const NV: u32 = {}u;\nalias VT = vec4<f32>;\nconst BR: u32 = {GEMM_ROWS}u;\n\
         const BT: u32 = {GEMM_TOKENS}u;\nconst WG: u32 = {GEMM_WG}u;\nconst KC: u32 = {kc}u;\n\
         const KC4: u32 = KC / 4u;\nconst UPS: u32 = {}u;\nconst VPU: u32 = {vpu}u;",
        layout.vals_per_block,
        layout.block_bytes,
        layout.units_per_block,
        layout.offsets.len(),
        kc / vpu,
    );
    s.push_str(&PRELUDE.replace("XELEM", "vec4<f32>"));
    s.push_str(layout.body);
    s.push_str(
        "var<workgroup> WS: array<vec4<f32>, BR * KC4>;\nvar<workgroup> XS: array<vec4<f32>, BT * KC4>;\n",
    );
    let mut stores = String::new();
    for (i, off) in layout.offsets.iter().enumerate() {
        let _ = writeln!(
            stores,
            "            WS[r * KC4 + ((col + {off}u) >> 2u)] = w[{i}];"
        );
    }
    // Each x loaded serves the invocation's 4 rows (unrolled: constant accumulator indices).
    let mut products = String::new();
    for j in 0..4 {
        let _ = writeln!(
            products,
            "            let x{j} = XS[(tx + {}u) * KC4 + k];",
            8 * j
        );
        for i in 0..4 {
            let _ = writeln!(
                products,
                "            acc[{}] += dot(w{i}, x{j});",
                4 * i + j
            );
        }
    }
    let _ = writeln!(
        s,
        r#"@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {{
    let row0 = (wid.y * P.groups_x + wid.x) * BR;
    let tok0 = wid.z * BT;
    let tokens = P.tokens;
    let tx = lid % 8u;
    let ty = lid / 8u;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < P.cols; k0 += KC) {{
        workgroupBarrier();
        for (var i = lid; i < BR * UPS; i += WG) {{
            let r = i / UPS;
            let u = k0 / VPU + i % UPS;
            let blk = u / UPB;
            let ub = u - blk * UPB;
            let rb = P.w_off + min(row0 + r, P.rows - 1u) * P.row_bytes;
            let w = decode(rb + blk * BB, ub);
            let col = blk * VPB + xbase(ub) - k0;
{stores}        }}
        for (var i = lid; i < BT * KC4; i += WG) {{
            let t = tok0 + i / KC4;
            var v = vec4<f32>(0.0);
            if (t < tokens) {{ v = X[(P.x_off + t * P.x_stride + k0 + 4u * (i % KC4)) >> 2u]; }}
            XS[i] = v;
        }}
        workgroupBarrier();
        for (var k = 0u; k < KC4; k++) {{
            let w0 = WS[ty * KC4 + k];
            let w1 = WS[(ty + 8u) * KC4 + k];
            let w2 = WS[(ty + 16u) * KC4 + k];
            let w3 = WS[(ty + 24u) * KC4 + k];
{products}        }}
    }}
    for (var q = 0u; q < 16u; q++) {{
        let row = row0 + ty + 8u * (q / 4u);
        let t = tok0 + tx + 8u * (q % 4u);
        if (row < P.rows && t < tokens) {{ Y[P.y_off + t * P.y_stride + row] = acc[q]; }}
    }}
}}"#
    );
    s
}

const PRELUDE: &str = r#"
struct Params {
    rows: u32, cols: u32, row_bytes: u32, units: u32,
    w_off: u32, x_off: u32, x_stride: u32, y_off: u32,
    y_stride: u32, groups_x: u32, tokens: u32, pad: u32,
}
@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> W4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<XELEM>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

fn mul1(a: f32, b: f32) -> f32 { return a * b; }

// Four bytes at any byte offset.
fn w32(off: u32) -> u32 {
    let i = off >> 2u;
    let s = (off & 3u) * 8u;
    // Branch-free (neighbouring blocks differ in alignment): at s = 0 the second word
    // shifts out entirely.
    return (W[i] >> s) | ((W[i + 1u] << (31u - s)) << 1u);
}
// Two bytes at an even offset.
fn w16(off: u32) -> u32 { return (W[off >> 2u] >> ((off & 2u) * 8u)) & 0xFFFFu; }
fn f16at(off: u32) -> f32 { return unpack2x16float(w16(off)).x; }
fn wbyte(off: u32) -> u32 { return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xFFu; }
fn sext8(b: u32) -> i32 { return bitcast<i32>(b << 24u) >> 24u; }
// The four bytes of a word, least significant first.
fn bytes4(w: u32) -> vec4<u32> { return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u); }
fn nlo(w: u32) -> vec4<u32> { return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u); }
fn nhi(w: u32) -> vec4<u32> { return (vec4<u32>(w) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u); }
// v - k as f32 for integers v < 2^23 without a conversion instruction (quarter-rate on some
// GPUs): v in the mantissa of 2^23, then 2^23 + k subtracted (exact). Measured neutral on an
// H200 (within run-to-run noise), kept as the cheaper form elsewhere.
fn u2f_minus(v: vec4<u32>, k: f32) -> vec4<f32> {
    return bitcast<vec4<f32>>(v | vec4<u32>(0x4B000000u)) - vec4<f32>(8388608.0 + k);
}
fn nib_lo(w: u32) -> vec4<f32> { return u2f_minus(nlo(w), 0.0); }
fn nib_hi(w: u32) -> vec4<f32> { return u2f_minus(nhi(w), 0.0); }
// Four i8: offset by 128 to unsigned, converted, 128 taken off again.
fn i8x4(w: u32) -> vec4<f32> { return u2f_minus(bytes4(w ^ 0x80808080u), 128.0); }
// Byte k of the 12 scale bytes shared by Q4_K and Q5_K.
fn sb(s: vec3<u32>, k: u32) -> u32 {
    let w = select(select(s.x, s.y, k >= 4u), s.z, k >= 8u);
    return (w >> ((k & 3u) * 8u)) & 0xFFu;
}
// Scale and min of sub-block j (0..8) of a Q4_K/Q5_K super-block.
fn k4_scale_min(s: vec3<u32>, j: u32) -> vec2<f32> {
    if (j < 4u) { return vec2<f32>(f32(sb(s, j) & 63u), f32(sb(s, j + 4u) & 63u)); }
    let sc = (sb(s, j + 4u) & 15u) | ((sb(s, j - 4u) >> 6u) << 4u);
    let m = (sb(s, j + 4u) >> 4u) | ((sb(s, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
// Scales and mins of chunk c's two sub-blocks (2c, 2c + 1) of the Q4_K/Q5_K super-block at
// word w: (d1, m1, d2, m2).
fn k4_chunk(w: u32, c: u32) -> vec4<f32> {
    let dm = unpack2x16float(W[w]);
    let s = vec3<u32>(W[w + 1u], W[w + 2u], W[w + 3u]);
    let sm1 = k4_scale_min(s, 2u * c);
    let sm2 = k4_scale_min(s, 2u * c + 1u);
    return vec4<f32>(dm.x * sm1.x, dm.y * sm1.y, dm.x * sm2.x, dm.y * sm2.y);
}
"#;

const LOAD_TILE_VEC: &str = r#"
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

const LOAD_TILE_SCALAR: &str = r#"
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

// Per type: xbase(u), the column (from the block's first) of unit u's first value, and
// decode(wb, u), unit u of the block at byte wb as values whose columns are xbase(u) plus the
// layout's offsets. Each mirrors quarry-kernels' scalar dequantization.

const F32_VEC: &str = r#"
fn xbase(u: u32) -> u32 { return 0u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    return array<VT, NV>(bitcast<vec4<f32>>(W4[wb >> 4u]));
}
"#;

const F32_SCALAR: &str = r#"
fn xbase(u: u32) -> u32 { return 0u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    return array<VT, NV>(bitcast<f32>(W[wb >> 2u]));
}
"#;

const F16_VEC: &str = r#"
fn xbase(u: u32) -> u32 { return 0u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let q = W4[wb >> 4u];
    return array<VT, NV>(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)),
                         vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)));
}
"#;

const F16_SCALAR: &str = r#"
fn xbase(u: u32) -> u32 { return 0u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    return array<VT, NV>(f16at(wb));
}
"#;

// Q8_0: f16 d, 32 i8. Unit u: values 16u..16u+16.
const Q8_0: &str = r#"
fn xbase(u: u32) -> u32 { return 16u * u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let d = f16at(wb);
    let o = wb + 2u + 16u * u;
    return array<VT, NV>(d * i8x4(w32(o)), d * i8x4(w32(o + 4u)),
                         d * i8x4(w32(o + 8u)), d * i8x4(w32(o + 12u)));
}
"#;

// Q4_0: f16 d, 16 bytes; byte j's low nibble is value j, its high nibble value j + 16.
// Unit u: bytes 8u..8u+8 (values 8u.. and 16 + 8u..).
const Q4_0: &str = r#"
fn xbase(u: u32) -> u32 { return 8u * u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let d = f16at(wb);
    let a = w32(wb + 2u + 8u * u);
    let b = w32(wb + 6u + 8u * u);
    return array<VT, NV>(d * u2f_minus(nlo(a), 8.0), d * u2f_minus(nlo(b), 8.0),
                         d * u2f_minus(nhi(a), 8.0), d * u2f_minus(nhi(b), 8.0));
}
"#;

// Q4_1: f16 d, f16 m, nibbles as Q4_0; value = q * d + m.
const Q4_1: &str = r#"
fn xbase(u: u32) -> u32 { return 8u * u; }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let w = wb >> 2u;
    let dm = unpack2x16float(W[w]);
    let a = W[w + 1u + 2u * u];
    let b = W[w + 2u + 2u * u];
    return array<VT, NV>(dm.x * nib_lo(a) + dm.y, dm.x * nib_lo(b) + dm.y,
                         dm.x * nib_hi(a) + dm.y, dm.x * nib_hi(b) + dm.y);
}
"#;

// Q5_0: f16 d, u32 qh (bit j: fifth bit of value j), nibbles as Q4_0; value = (q - 16) * d.
const Q5_0: &str = r#"
fn xbase(u: u32) -> u32 { return 8u * u; }
fn q5_high(qh: vec4<u32>, first: u32) -> vec4<u32> {
    let sh = vec4<u32>(first) + vec4<u32>(0u, 1u, 2u, 3u);
    return ((qh >> sh) & vec4<u32>(1u)) << vec4<u32>(4u);
}
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let d = f16at(wb);
    let qh = vec4<u32>(w32(wb + 2u));
    let a = w32(wb + 6u + 8u * u);
    let b = w32(wb + 10u + 8u * u);
    let j = 8u * u;
    return array<VT, NV>(d * u2f_minus(nlo(a) | q5_high(qh, j), 16.0),
                         d * u2f_minus(nlo(b) | q5_high(qh, j + 4u), 16.0),
                         d * u2f_minus(nhi(a) | q5_high(qh, j + 16u), 16.0),
                         d * u2f_minus(nhi(b) | q5_high(qh, j + 20u), 16.0));
}
"#;

// Q4_K: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes; 64 values per 32 bytes (low
// nibbles sub-block 2c, high 2c + 1). Unit u: chunk c = u / 2, bytes 16 * (u % 2) of it.
const Q4_K: &str = r#"
fn xbase(u: u32) -> u32 { return 64u * (u >> 1u) + 16u * (u & 1u); }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let c = u >> 1u;
    let k = k4_chunk(wb >> 2u, c);
    let d1 = k.x;
    let m1 = k.y;
    let d2 = k.z;
    let m2 = k.w;
    let q = W4[(wb + 16u + 32u * c + 16u * (u & 1u)) >> 4u];
    return array<VT, NV>(
        d1 * nib_lo(q.x) - m1, d1 * nib_lo(q.y) - m1, d1 * nib_lo(q.z) - m1, d1 * nib_lo(q.w) - m1,
        d2 * nib_hi(q.x) - m2, d2 * nib_hi(q.y) - m2, d2 * nib_hi(q.z) - m2, d2 * nib_hi(q.w) - m2);
}
"#;

// Q5_K: Q4_K with 32 bytes qh before the nibbles; bit s of qh[l] is the fifth bit of
// sub-block s's value l.
const Q5_K: &str = r#"
fn xbase(u: u32) -> u32 { return 64u * (u >> 1u) + 16u * (u & 1u); }
fn q5k_bit(h: u32, b: u32) -> vec4<u32> {
    return ((bytes4(h) >> vec4<u32>(b)) & vec4<u32>(1u)) << vec4<u32>(4u);
}
fn q5k(n: vec4<u32>, h: u32, b: u32) -> vec4<f32> { return u2f_minus(n | q5k_bit(h, b), 0.0); }
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let c = u >> 1u;
    let hf = u & 1u;
    let k = k4_chunk(wb >> 2u, c);
    let d1 = k.x;
    let m1 = k.y;
    let d2 = k.z;
    let m2 = k.w;
    let qh = W4[(wb + 16u + 16u * hf) >> 4u];
    let q = W4[(wb + 48u + 32u * c + 16u * hf) >> 4u];
    let b1 = 2u * c;
    let b2 = 2u * c + 1u;
    return array<VT, NV>(
        d1 * q5k(nlo(q.x), qh.x, b1) - m1, d1 * q5k(nlo(q.y), qh.y, b1) - m1,
        d1 * q5k(nlo(q.z), qh.z, b1) - m1, d1 * q5k(nlo(q.w), qh.w, b1) - m1,
        d2 * q5k(nhi(q.x), qh.x, b2) - m2, d2 * q5k(nhi(q.y), qh.y, b2) - m2,
        d2 * q5k(nhi(q.z), qh.z, b2) - m2, d2 * q5k(nhi(q.w), qh.w, b2) - m2);
}
"#;

// Q6_K: 128 bytes ql, 64 bytes qh, 16 i8 scales, f16 d. Per 128-value half h: ql[l] low/high
// nibbles are values l and l + 64, ql[l + 32] values l + 32 and l + 96; qh[l] bit pairs top
// values l, l + 32, l + 64, l + 96. Unit u: half u / 4, l in 8 * (u % 4)..+8.
const Q6_K: &str = r#"
fn xbase(u: u32) -> u32 { return 128u * (u >> 2u) + 8u * (u & 3u); }
fn q6k_quad(wb: u32, h: u32, l0: u32) -> array<vec4<f32>, 4> {
    let a = bytes4(w32(wb + 64u * h + l0));
    let b = bytes4(w32(wb + 64u * h + 32u + l0));
    let hv = bytes4(w32(wb + 128u + 32u * h + l0));
    let three = vec4<u32>(3u);
    let four = vec4<u32>(4u);
    return array<vec4<f32>, 4>(
        u2f_minus((a & vec4<u32>(15u)) | ((hv & three) << four), 32.0),
        u2f_minus((b & vec4<u32>(15u)) | (((hv >> vec4<u32>(2u)) & three) << four), 32.0),
        u2f_minus((a >> four) | (((hv >> four) & three) << four), 32.0),
        u2f_minus((b >> four) | (((hv >> vec4<u32>(6u)) & three) << four), 32.0));
}
fn decode(wb: u32, u: u32) -> array<VT, NV> {
    let h = u >> 2u;
    let g = u & 3u;
    let d = f16at(wb + 208u);
    let so = wb + 192u + 8u * h + (g >> 1u);
    let s = d * vec4<f32>(f32(sext8(wbyte(so))), f32(sext8(wbyte(so + 2u))),
                          f32(sext8(wbyte(so + 4u))), f32(sext8(wbyte(so + 6u))));
    let p = q6k_quad(wb, h, 8u * g);
    let q = q6k_quad(wb, h, 8u * g + 4u);
    return array<VT, NV>(s.x * p[0], s.y * p[1], s.z * p[2], s.w * p[3],
                         s.x * q[0], s.y * q[1], s.z * q[2], s.w * q[3]);
}
"#;

const REDUCE_SHARED_END: &str = r#"
    for (var k = lid; k < K; k += WG) {
        let row = row0 + k / T;
        if (row < P.rows) { Y[P.y_off + (k % T) * P.y_stride + row] = RED[k * WG]; }
    }
"#;

// One partial per subgroup (written above), summed through shared memory.
const REDUCE_SUBGROUP_END: &str = r#"
    workgroupBarrier();
    for (var k = lid; k < K; k += WG) {
        let row = row0 + k / T;
        if (row < P.rows) {
            var sum = 0.0;
            for (var j = 0u; j < n_sg; j++) { sum += RED[k * WG + j]; }
            Y[P.y_off + (k % T) * P.y_stride + row] = sum;
        }
    }
"#;
