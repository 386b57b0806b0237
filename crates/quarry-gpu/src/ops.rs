//! The forward pass's operations other than the matrix products, as WGSL kernels: RMS norm,
//! bias, residual add, gated activation, soft-cap, RoPE, storing keys and values into a pool's
//! blocks (and copying a block's first positions), and attention over them through a
//! sequence's block table.
//!
//! Every kernel reads its parameters from one uniform of three `vec4<u32>` (floats as their
//! bits), so one binding layout serves all of them; wgpu derives each pipeline's layout from
//! its shader. Element-wise kernels index a 2-D grid of workgroups (`x + y · groups_x`), as
//! one dimension holds at most 65 535 of them. They compute in `f32`, as the CPU does; the
//! CPU reference they are tested against is `quarry_model::ops` (tests/forward.rs).

/// A kernel of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Add,
    Bias,
    Softcap,
    Gated,
    RmsNorm,
    Rope,
    KvStore,
    KvCopy,
    Attention,
}

impl Op {
    /// Whether each storage binding (from binding 1 on) is read only, in binding order.
    pub(crate) fn storage(self) -> &'static [bool] {
        match self {
            Op::Add | Op::Bias | Op::Gated | Op::RmsNorm | Op::Rope => &[false, true],
            Op::Softcap => &[false],
            // k, v, block table, the pool's keys, its values.
            Op::KvStore => &[true, true, true, false, false],
            // The pool's keys, its values.
            Op::KvCopy => &[false, false],
            // q, keys, values, output, scores, block table.
            Op::Attention => &[true, true, true, false, false, true],
        }
    }
}

/// Invocations per workgroup of every kernel here.
pub(crate) const WORKGROUP: u32 = 64;

const PARAMS: &str = "struct P { a: vec4<u32>, b: vec4<u32>, c: vec4<u32> }
@group(0) @binding(0) var<uniform> p: P;
";

/// `tanh` with its argument bounded: some drivers compute it from `exp`, which overflows.
const TANH: &str = "fn tanh_safe(x: f32) -> f32 { return tanh(clamp(x, -15.0, 15.0)); }
";

/// An element-wise kernel over `p.a.x` values: `body` sees the index `i`.
fn elementwise(bindings: &str, body: &str) -> String {
    format!(
        "{PARAMS}{TANH}{bindings}
@compute @workgroup_size({WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let i = (wid.x + wid.y * p.a.y) * {WORKGROUP}u + lid;
    if (i >= p.a.x) {{ return; }}
    {body}
}}
"
    )
}

impl Op {
    /// The WGSL source of the kernel.
    pub(crate) fn source(self) -> String {
        let x_rw = "@group(0) @binding(1) var<storage, read_write> x: array<f32>;\n";
        match self {
            // a.x = values, a.y = groups_x.
            Op::Add => elementwise(
                &format!("{x_rw}@group(0) @binding(2) var<storage, read> y: array<f32>;\n"),
                "x[i] = x[i] + y[i];",
            ),
            // a.z = row length.
            Op::Bias => elementwise(
                &format!("{x_rw}@group(0) @binding(2) var<storage, read> b: array<f32>;\n"),
                "x[i] = x[i] + b[i % p.a.z];",
            ),
            // a.z = the cap's bits.
            Op::Softcap => elementwise(
                x_rw,
                "let cap = bitcast<f32>(p.a.z); x[i] = cap * tanh_safe(x[i] / cap);",
            ),
            // a.z = 0 for SiLU, 1 for GELU (tanh approximation).
            Op::Gated => elementwise(
                &format!("{x_rw}@group(0) @binding(2) var<storage, read> up: array<f32>;\n"),
                "let g = x[i];
    var a: f32;
    if (p.a.z == 0u) {
        a = g / (1.0 + exp(-g));
    } else {
        a = 0.5 * g * (1.0 + tanh_safe(0.7978845608028654 * (g + 0.044715 * g * g * g)));
    }
    x[i] = a * up[i];",
            ),
            Op::RmsNorm => RMS_NORM.to_string(),
            Op::Rope => format!("{PARAMS}{ROPE}"),
            Op::KvStore => format!("{PARAMS}{KV_STORE}"),
            // a.x = words, a.y = groups_x, a.z = first word read, a.w = first word written
            // (a copy within one buffer, which a buffer-to-buffer copy may not do).
            Op::KvCopy => elementwise(
                "@group(0) @binding(1) var<storage, read_write> kc: array<u32>;
@group(0) @binding(2) var<storage, read_write> vc: array<u32>;
",
                "kc[p.a.w + i] = kc[p.a.z + i]; vc[p.a.w + i] = vc[p.a.z + i];",
            ),
            Op::Attention => format!("{PARAMS}{TANH}{ATTENTION}"),
        }
    }
}

/// One workgroup per run of `a.x` values (`a.y` runs, `a.w` = groups_x), `x ← x · g / rms(x)`
/// with `a.z` the bits of epsilon.
const RMS_NORM: &str = "struct P { a: vec4<u32>, b: vec4<u32>, c: vec4<u32> }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
var<workgroup> part: array<f32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let run = wid.x + wid.y * p.a.w;
    let width = p.a.x;
    let base = run * width;
    var s = 0.0;
    if (run < p.a.y) {
        for (var i = lid; i < width; i += 64u) { let v = x[base + i]; s += v * v; }
    }
    part[lid] = s;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) { part[lid] += part[lid + k]; }
        workgroupBarrier();
    }
    if (run >= p.a.y) { return; }
    let inv = 1.0 / sqrt(part[0] / f32(width) + bitcast<f32>(p.a.z));
    for (var i = lid; i < width; i += 64u) { x[base + i] = x[base + i] * inv * g[i]; }
}
";

/// One invocation per pair of one head of one row: `a.x` pairs in all, `a.y` = groups_x,
/// `a.z` heads per row, `a.w` pairs per head (rotated dims / 2); `b.x` head_dim, `b.y` 0 for
/// adjacent pairs and 1 for halves; `cs` holds `[cos, sin]` per row and pair.
const ROPE: &str = "@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<vec2<f32>>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * p.a.y) * 64u + lid;
    if (i >= p.a.x) { return; }
    let half = p.a.w;
    let pair = i % half;
    let rh = i / half;
    let head = rh % p.a.z;
    let row = rh / p.a.z;
    let base = (row * p.a.z + head) * p.b.x;
    var a = base + 2u * pair;
    var b = a + 1u;
    if (p.b.y == 1u) { a = base + pair; b = a + half; }
    let c = cs[row * half + pair];
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * c.x - x1 * c.y;
    x[b] = x0 * c.y + x1 * c.x;
}
";

/// One invocation per pair of values of one row: rows `b.x ..` of `k` and `v` (`a.z` pairs
/// each) go to positions `b.y ..` of the sequence, through its block table (`a.w` positions
/// a block), as `f16` pairs. `a.x` pairs in all, `a.y` = groups_x.
const KV_STORE: &str = "@group(0) @binding(1) var<storage, read> k: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read> v: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> tab: array<u32>;
@group(0) @binding(4) var<storage, read_write> kc: array<u32>;
@group(0) @binding(5) var<storage, read_write> vc: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * p.a.y) * 64u + lid;
    if (i >= p.a.x) { return; }
    let t = i / p.a.z;
    let e = i % p.a.z;
    let pos = p.b.y + t;
    let dst = (tab[pos / p.a.w] * p.a.w + pos % p.a.w) * p.a.z + e;
    let src = (p.b.x + t) * p.a.z + e;
    kc[dst] = pack2x16float(k[src]);
    vc[dst] = pack2x16float(v[src]);
}
";

/// One workgroup per (head, query row) of one sequence: scores of the visible positions into
/// `sc`, their softmax, and the weighted sum of values. Keys and values are `f16` pairs in the
/// pool's rows, position `j` at row `tab[j / a.x] · a.x + j % a.x`. `a` = (positions per
/// block, heads, head_dim (even), heads per KV head), `b` = (kv_dim, position of the
/// sequence's row 0, window or 0, positions per score row), `c` = (scale bits, soft-cap bits
/// or 0, the sequence's first row of this dispatch, the sequence's row 0 in `q` and `o`).
const ATTENTION: &str = "@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> sc: array<f32>;
@group(0) @binding(6) var<storage, read> tab: array<u32>;
var<workgroup> red: array<f32, 64>;
fn krow(j: u32) -> u32 { return tab[j / p.a.x] * p.a.x + j % p.a.x; }
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    let row = p.c.z + t;
    let hd = p.a.z;
    let pos = p.b.y + row;
    var first = 0u;
    if (p.b.z > 0u && pos + 1u > p.b.z) { first = pos + 1u - p.b.z; }
    let kb = (h / p.a.w) * hd;
    let qb = ((p.c.w + row) * p.a.y + h) * hd;
    let sb = (t * p.a.y + h) * p.b.w;
    let scale = bitcast<f32>(p.c.x);
    let cap = bitcast<f32>(p.c.y);
    var m = -3.0e38;
    for (var j = first + lid; j <= pos; j += 64u) {
        var s = 0.0;
        let kr = (krow(j) * p.b.x + kb) >> 1u;
        for (var e = 0u; e < hd; e += 2u) {
            let kv = unpack2x16float(kc[kr + (e >> 1u)]);
            s += q[qb + e] * kv.x + q[qb + e + 1u] * kv.y;
        }
        s = s * scale;
        if (cap > 0.0) { s = cap * tanh_safe(s / cap); }
        sc[sb + j] = s;
        m = max(m, s);
    }
    red[lid] = m;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) { red[lid] = max(red[lid], red[lid + k]); }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = first + lid; j <= pos; j += 64u) {
        let e = exp(sc[sb + j] - mx);
        sc[sb + j] = e;
        sum += e;
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (lid < k) { red[lid] += red[lid + k]; }
        workgroupBarrier();
    }
    let total = red[0];
    storageBarrier();
    // Each invocation a pair of the head's values, a block's positions at a time (one table
    // lookup per block, not per position).
    let bs = p.a.x;
    for (var e = 2u * lid; e < hd; e += 128u) {
        var acc = vec2<f32>(0.0);
        var j = first;
        while (j <= pos) {
            let blk = j / bs;
            let end = min(pos, blk * bs + bs - 1u);
            // Row of position j: tab[blk] · bs + (j − blk · bs).
            let shift = tab[blk] * bs - blk * bs;
            for (; j <= end; j++) {
                acc += sc[sb + j] * unpack2x16float(vc[((j + shift) * p.b.x + kb + e) >> 1u]);
            }
        }
        o[qb + e] = acc.x / total;
        o[qb + e + 1u] = acc.y / total;
    }
}
";
