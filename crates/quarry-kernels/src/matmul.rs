//! Weight matrices borrowed from a model file, and the reference matrix product over them.
//!
//! Weights stay in their stored block format; only a small piece is ever decoded to `f32`:
//! up to [`ROWWISE_MAX_TOKENS`] tokens, a group of 8 rows at a time, dotted with every
//! token; for larger batches, a tile of rows (about [`TILE_BYTES`] of `f32`)
//! handed to an sgemm. Rows are split across the kernel thread pool in chunks or tiles, so
//! each task amortizes its scheduling cost.
//!
//! Invariant: a [`WeightView`] always holds a decodable type, `cols` a whole number of
//! blocks and exactly `rows * row_bytes` bytes, so decoding any row or run of rows is
//! in bounds.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use quarry_format::GgmlType;

use crate::act::QuantizedActivations;
use crate::dequant::{decoder, encoded_len, DecodeFn};
use crate::dot::{
    gemv_packed_tokens, gemv_rows, has_integer_kernel, kquant_panels, packed, quantize_for, Isa,
    PackedRows,
};
use crate::pool;
use crate::vec::dot_rows;
use crate::KernelError;

/// A 2-D weight matrix borrowed from a file: `rows` rows of `cols` values each, rows
/// contiguous, each row a whole number of blocks.
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// Checks that `dtype` can be decoded, that `cols` is a whole number of blocks and that
    /// `data` holds exactly `rows` rows.
    pub fn new(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        if decoder(dtype).is_none() {
            return Err(KernelError::UnsupportedType {
                dtype,
                op: "weight matrix",
            });
        }
        let row_bytes = encoded_len(dtype, cols)?;
        let expected = rows.checked_mul(row_bytes).ok_or(KernelError::TooLarge {
            what: "weight matrix size",
            dtype,
            rows,
            cols,
        })?;
        if data.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "weight matrix bytes",
                expected,
                actual: data.len(),
            });
        }
        Ok(WeightView {
            dtype,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of one encoded row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The encoded matrix, `rows * row_bytes` bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Rows `rows` of this matrix as a matrix of their own (one part of a fused projection).
    /// Panics if the range is not within `0..rows`.
    pub fn row_range(&self, rows: std::ops::Range<usize>) -> WeightView<'a> {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "row_range: {rows:?} out of range for {} rows",
            self.rows
        );
        WeightView {
            rows: rows.len(),
            data: self.row_data(rows.start, rows.len()),
            ..*self
        }
    }

    /// Decodes row `row` into `out` (an embedding lookup). Panics if `row >= rows` or
    /// `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows,
            "dequantize_row: row {row} out of range for {} rows",
            self.rows
        );
        assert_eq!(
            out.len(),
            self.cols,
            "dequantize_row: output has {} values, the matrix has {} columns",
            out.len(),
            self.cols
        );
        self.decode()(self.row_data(row, 1), out);
    }

    fn decode(&self) -> DecodeFn {
        decoder(self.dtype).expect("WeightView::new accepts only decodable types")
    }

    /// The encoded bytes of rows `first..first + n`.
    fn row_data(&self, first: usize, n: usize) -> &'a [u8] {
        &self.data[first * self.row_bytes..(first + n) * self.row_bytes]
    }
}

/// Shows the shape, not the (possibly gigabytes of) data.
impl fmt::Debug for WeightView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightView")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("row_bytes", &self.row_bytes)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// A weight matrix as a model keeps it: the file's [`WeightView`], plus, where this CPU's
/// decode kernel for its type reads a layout of its own ([`PackedRows`]), that copy, made
/// once at load. Every product then reads the copy (`f32` prompt products decode rows
/// written back from it), so the view's bytes are needed only by tools that read the matrix
/// as data.
pub struct Matrix<'a> {
    view: WeightView<'a>,
    packed: Option<PackedRows>,
}

impl<'a> Matrix<'a> {
    /// Wraps `view`, repacking it when the kernel level in use ([`Isa::best`]) has a panel
    /// kernel for its type.
    pub fn new(view: WeightView<'a>) -> Matrix<'a> {
        Matrix::releasing(view, false, &|_| {})
    }

    /// Wraps `view` without a repacked copy: products read the file's rows with the row
    /// kernels. For a model whose products run on another device, where a copy would only
    /// take host memory.
    pub fn unpacked(view: WeightView<'a>) -> Matrix<'a> {
        Matrix { view, packed: None }
    }

    /// [`Matrix::new`] (or, with `single_rows`, [`Matrix::for_single_rows`]) that hands
    /// `release` the file bytes of each run of rows as soon as their repacked copy is written,
    /// when no product will read them again ([`Matrix::reads_file`] is false), so that a
    /// model can let those pages go while the rest is packed: the load then never holds a
    /// large matrix twice (Gemma 3's 178 MB output head: peak RSS of `run` 385 → 317 MiB).
    pub fn releasing(
        view: WeightView<'a>,
        single_rows: bool,
        release: &dyn Fn(&[u8]),
    ) -> Matrix<'a> {
        if single_rows && kquant_panels::supports(view.dtype) {
            return Matrix::unpacked(view);
        }
        let keep = |_: &[u8]| {};
        let release = match view.dtype == GgmlType::Q6_K {
            // Its decode tokens read the file (`decodes_from_file`).
            true => &keep as &dyn Fn(&[u8]),
            false => release,
        };
        Matrix {
            view,
            packed: PackedRows::for_isa_releasing(&view, Isa::best(), release),
        }
    }

    /// Wraps `view` for products that read it a row of activations at a time (a model's
    /// output head: one row per decode step and per prompt), repacking it only where the
    /// panel kernel is as fast as the row kernel for a single token. For the K-quants it is
    /// not: their row kernels decode faster (Llama-3.2-1B-shaped Q4_K_M, Q6_K head, 2-core
    /// Zen 4: 34–39 tok/s with the head row by row, 28 with it in panels).
    pub fn for_single_rows(view: WeightView<'a>) -> Matrix<'a> {
        Matrix::releasing(view, true, &|_| {})
    }

    /// The matrix as stored in the file.
    pub fn view(&self) -> WeightView<'a> {
        self.view
    }

    /// Whether products read a repacked copy (prompt rows always, decode tokens unless
    /// [`Matrix::reads_file`]).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Row `r` decoded to `f32` (`out` has `cols` values), read from the repacked copy where
    /// there is one: a tied embedding looked up through its output head then touches none of
    /// the file pages the model released (each lookup of a released page maps its
    /// neighbours back in too: Qwen2.5-0.5B-shaped, 512 prompt tokens, ~100 MB).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut scratch = Vec::new();
        let bytes = EncodedRows::rows(self, r, 1, &mut scratch);
        crate::dequantize(self.view.dtype, bytes, out).expect("a row of a checked matrix");
    }

    /// Whether products read the file's rows, whose pages must then stay: every product of
    /// a matrix that is not repacked, and the decode tokens of a Q6_K one.
    pub fn reads_file(&self) -> bool {
        self.packed.is_none() || self.decodes_from_file()
    }

    /// Whether decode tokens read the file's rows on the row kernel while prompt rows read
    /// the panels: for a repacked Q6_K matrix, whose row kernel reads a single token's
    /// products about twice as fast as its panel kernel (1024 × 2560 and 2048 × 8192,
    /// 2 threads, 2-core Zen 4: 31 and 26 GB/s against 14.5 and 15), while prompts gain from
    /// the panels (Llama-3.2-1B-shaped Q4_K_M, pp256: 270 tok/s with Q6_K panels, 202
    /// without).
    fn decodes_from_file(&self) -> bool {
        self.packed.is_some() && self.view.dtype == GgmlType::Q6_K
    }
}

impl fmt::Debug for Matrix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matrix")
            .field("view", &self.view)
            .field("packed", &self.is_packed())
            .finish()
    }
}

/// y = x · Wᵀ for a batch: `x` is `n_tokens × cols` (row-major), `y` is `n_tokens × rows`.
///
/// Panics when `x` or `y` do not have those lengths: the caller sized both buffers, so a
/// mismatch is a bug in the caller, not bad input.
pub fn matmul(w: &WeightView<'_>, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_from(w, x, n_tokens, y)
}

/// Where the `f32` paths read a matrix's encoded rows: its file view, or for a packed
/// [`Matrix`] the packed copy written back a few rows at a time into a scratch buffer, so a
/// packed matrix's file pages are never read again after packing.
trait EncodedRows: Sync {
    fn view(&self) -> &WeightView<'_>;

    /// The encoded bytes of rows `first..first + n`, using `scratch` if they must be made.
    fn rows<'s>(&'s self, first: usize, n: usize, scratch: &'s mut Vec<u8>) -> &'s [u8];
}

impl EncodedRows for WeightView<'_> {
    fn view(&self) -> &WeightView<'_> {
        self
    }

    fn rows<'s>(&'s self, first: usize, n: usize, _: &'s mut Vec<u8>) -> &'s [u8] {
        self.row_data(first, n)
    }
}

impl EncodedRows for Matrix<'_> {
    fn view(&self) -> &WeightView<'_> {
        &self.view
    }

    fn rows<'s>(&'s self, first: usize, n: usize, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        match &self.packed {
            Some(p) => {
                scratch.resize(n * self.view.row_bytes, 0);
                p.unpack_rows(first, n, scratch);
                scratch
            }
            None => self.view.row_data(first, n),
        }
    }
}

/// [`matmul`] on any source of encoded rows.
fn matmul_from<W: EncodedRows>(m: &W, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let w = m.view();
    assert_eq!(
        Some(x.len()),
        n_tokens.checked_mul(w.cols),
        "matmul: x has {} values, expected n_tokens {n_tokens} × cols {}",
        x.len(),
        w.cols
    );
    assert_eq!(
        Some(y.len()),
        n_tokens.checked_mul(w.rows),
        "matmul: y has {} values, expected n_tokens {n_tokens} × rows {}",
        y.len(),
        w.rows
    );
    if y.is_empty() {
        return;
    }
    if n_tokens <= ROWWISE_MAX_TOKENS {
        matmul_rowwise(m, x, n_tokens, y);
    } else {
        matmul_tiled(m, x, n_tokens, y);
    }
}

/// y = x · Wᵀ like [`matmul`], with `x` given as [`QuantizedActivations`] so that several
/// matrices reading the same input (Q, K and V; gate and up) share one 8-bit quantization.
///
/// Which rows are multiplied in 8 bits is the CPU backend's policy, per matrix:
/// - a matrix repacked into panels ([`PackedRows`]: the 32-value types, Q4_K and Q6_K) takes
///   every row on its panel kernel, prompts included, as llama.cpp does for every type: 8-bit
///   products run ~3.5× faster than the `f32` GEMM on prompts (Llama-3.2-1B-shaped Q4_0,
///   pp512: 268 against 75 tok/s); except that a Q6_K matrix takes its decode tokens on the
///   row kernel over the file's rows, which is faster for them (see [`Matrix`]);
/// - another matrix with an integer kernel (the other K-quants, and a K-quant output head,
///   see [`Matrix::for_single_rows`]) takes its decode tokens (the first
///   [`QuantizedActivations::integer_tokens`] rows) on the fused dequantize-and-dot path and
///   the other rows on [`matmul`]'s `f32` paths;
/// - a type without one (`f32`, `f16`, ...) takes every row in `f32`.
///
/// Every row's products are computed exactly as if it were alone in the batch, whichever
/// path it takes.
pub fn matmul_quantized(w: &Matrix<'_>, x: &QuantizedActivations<'_>, y: &mut [f32]) {
    matmul_quantized_many(&mut [(w, y)], x)
}

/// Several [`matmul_quantized`] products of the same activations (Q, K and V; gate and up),
/// whose decode tokens are computed in one dispatch of the thread pool, so threads meet once
/// instead of once per matrix.
pub fn matmul_quantized_many(
    products: &mut [(&Matrix<'_>, &mut [f32])],
    x: &QuantizedActivations<'_>,
) {
    let (n, cols) = (x.n_tokens(), x.cols());
    for (m, y) in products.iter() {
        let w = &m.view;
        assert_eq!(
            cols, w.cols,
            "matmul_quantized: activations have {cols} columns, W has {}",
            w.cols
        );
        assert_eq!(
            y.len(),
            n * w.rows,
            "matmul_quantized: y has {} values, expected {n} × {} rows",
            y.len(),
            w.rows
        );
    }
    let decode = x.integer_tokens();
    let mut integer = Vec::new();
    for (m, y) in products.iter_mut() {
        let m: &Matrix<'_> = m;
        let w = &m.view;
        let split = if m.packed.is_some() {
            n
        } else if has_integer_kernel(w.dtype) {
            decode
        } else {
            0
        };
        let (by_int, by_f32) = y.split_at_mut(split * w.rows);
        let mut first = split;
        let mut rest = by_f32;
        for (len, short) in f32_runs(&x.segments_from(split)) {
            let (y, tail) = rest.split_at_mut(len * w.rows);
            let rows = &x.f32()[first * cols..(first + len) * cols];
            if short {
                matmul_rowwise(m, rows, len, y);
            } else {
                matmul_from(m, rows, len, y);
            }
            first += len;
            rest = tail;
        }
        if split > 0 {
            quantize_for(w.dtype, x);
            integer.push((m, by_int));
        }
    }
    let isa = Isa::best();
    let pool = pool::global();
    // A few tasks per thread and matrix balance uneven progress; whole panels (16 rows) suit
    // kernels that process several rows per pass over the activations. A task computes its
    // rows for every decode token while they are in cache, and locks only its own slices,
    // so the locks are never contended.
    let tasks: Vec<DecodeTask<'_, '_, '_>> = integer
        .into_iter()
        .flat_map(|(m, y)| {
            let chunk = m
                .view
                .rows
                .div_ceil(4 * pool.n_threads())
                .clamp(16, 512)
                .next_multiple_of(packed::PANEL);
            let mut pieces: Vec<Vec<&mut [f32]>> = (0..m.view.rows.div_ceil(chunk))
                .map(|_| Vec::with_capacity(decode))
                .collect();
            for token_out in y.chunks_mut(m.view.rows) {
                for (c, piece) in token_out.chunks_mut(chunk).enumerate() {
                    pieces[c].push(piece);
                }
            }
            pieces
                .into_iter()
                .enumerate()
                .map(move |(c, outs)| (m, c * chunk, Mutex::new(outs)))
        })
        .collect();
    pool.run(tasks.len(), &|i| {
        let (w, first, outs) = &tasks[i];
        let mut outs = outs.lock().unwrap_or_else(PoisonError::into_inner);
        let rows = *first..*first + outs[0].len();
        // The tokens before `by_panels` take the row kernel on the file's rows.
        let by_panels = match &w.packed {
            Some(_) if w.decodes_from_file() => decode.min(outs.len()),
            Some(_) => 0,
            None => outs.len(),
        };
        let (by_rows, rest) = outs.split_at_mut(by_panels);
        for (t, out) in by_rows.iter_mut().enumerate() {
            gemv_rows(isa, &w.view, rows.clone(), x, t, out);
        }
        if let (Some(p), false) = (&w.packed, rest.is_empty()) {
            gemv_packed_tokens(p, rows, x, by_panels, rest);
        }
    });
}

/// How the `f32` segments of a batch are multiplied: consecutive segments short enough for
/// the row-wise path are merged into one row-wise product (its result for a token does not
/// depend on the other tokens: tested), longer ones go alone through [`matmul`]; so each
/// segment gets exactly what it would get alone. Yields `(rows, merged row-wise)`.
fn f32_runs(segments: &[usize]) -> Vec<(usize, bool)> {
    let mut runs: Vec<(usize, bool)> = Vec::new();
    for &len in segments.iter().filter(|&&l| l > 0) {
        let short = len <= ROWWISE_MAX_TOKENS;
        match runs.last_mut() {
            Some((merged, true)) if short => *merged += len,
            _ => runs.push((len, short)),
        }
    }
    runs
}

/// A run of rows of one matrix, starting at the given row, and where its products for each
/// decode token go.
type DecodeTask<'w, 'd, 'y> = (&'w Matrix<'d>, usize, Mutex<Vec<&'y mut [f32]>>);

/// Up to this many tokens, decoding a few rows at a time and dotting them with every token
/// beats decoding whole tiles for the GEMM, whose decoding, transposing and packing only pay
/// off over many tokens (measured crossover on Gemma 3 270M and SmolLM2: 48 to 64 tokens).
const ROWWISE_MAX_TOKENS: usize = 48;

/// Values decoded at once by [`matmul_rowwise`]; every block size (1, 32, 256) divides it,
/// so each piece of a row is whole blocks.
const PIECE: usize = 256;

/// Small-batch product: groups of rows are decoded into a small buffer and dotted with every
/// token of `x`, so each weight is decoded once and the matrix is never decoded whole.
fn matmul_rowwise<W: EncodedRows>(m: &W, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let w = m.view();
    if n_tokens == 1 {
        rowwise_by_row(m, x, 1, y);
        return;
    }
    // Threads own contiguous runs of rows, so results are gathered row-major and then
    // transposed into y's token-major layout (a pass over n_tokens × rows values, split
    // across the threads by token).
    let mut by_row = vec![0f32; w.rows * n_tokens];
    rowwise_by_row(m, x, n_tokens, &mut by_row);
    pool::global().for_each_chunk_mut(y, w.rows, &|t, token_out| {
        for (v, vals) in token_out.iter_mut().zip(by_row.chunks_exact(n_tokens)) {
            *v = vals[t];
        }
    });
}

/// Fills `out[r * n_tokens + t]` with row r of W dotted with token t of `x`.
fn rowwise_by_row<W: EncodedRows>(m: &W, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    let w = m.view();
    // Rows decoded together: a few tens of KiB of `f32` that stay in cache while every token
    // is dotted with them.
    const GROUP: usize = 8;
    let decode = w.decode();
    let cols = w.cols;
    // A few chunks per thread balance uneven progress without one task per row.
    let pool = pool::global();
    let chunk = w
        .rows
        .div_ceil(4 * pool.n_threads())
        .clamp(GROUP, 256)
        .next_multiple_of(GROUP);
    pool.for_each_chunk_mut(out, chunk * n_tokens, &|c, outs| {
        let mut buf = vec![0f32; GROUP * cols];
        let mut scratch = Vec::new();
        for (g, out_group) in outs.chunks_mut(GROUP * n_tokens).enumerate() {
            let n_rows = out_group.len() / n_tokens;
            let rows = &mut buf[..n_rows * cols];
            decode(m.rows(c * chunk + g * GROUP, n_rows, &mut scratch), rows);
            dot_rows(rows, x, cols, cols, out_group);
        }
    });
}

/// Target size of one decoded tile. The GEMM packs the tile into its own buffers, so the
/// tile need not fit a cache; what matters is width: measured on AVX-512 cores,
/// matrixmultiply reaches ~35 GFLOP/s per core on 64-row tiles, ~46 on 128 and ~56 on 256.
const TILE_BYTES: usize = 1024 * 1024;

/// Rows per tile: as many as fit in [`TILE_BYTES`] (64 to 256), adjusted so the tile count
/// is a multiple of the thread count (no thread idles while another finishes a last tile),
/// and rounded to a multiple of 8 to suit the GEMM's register blocking.
fn tile_rows(rows: usize, cols: usize, threads: usize) -> usize {
    let by_cache = (TILE_BYTES / (4 * cols.max(1))).clamp(64, 256);
    let tiles = rows.div_ceil(by_cache).next_multiple_of(threads);
    rows.div_ceil(tiles).next_multiple_of(8)
}

/// `y`'s base pointer, shared by tiles that each write a disjoint set of its columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write through the pointer only at the columns of their own tile (see
// `matmul_tiled`), so no element is touched by two threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method rather than field access, so closures capture the `Sync` wrapper and not
    /// the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Batched product: tiles of rows are decoded into an `f32` scratch buffer and multiplied
/// with all of `x` by `matrixmultiply::sgemm` (which picks AVX/FMA/AVX-512 kernels at run
/// time), writing the tile's columns of `y` in place.
///
/// sgemm packs its operands into panels, and that packing gathers with a stride unless A is
/// column-major and B row-major; the gathering version measured ~25% slower at 512 tokens
/// and several times slower at a few dozen. So `x` is transposed once per call and each tile
/// is decoded straight into B's row-major layout (cols × tile rows).
fn matmul_tiled<W: EncodedRows>(m: &W, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let w = m.view();
    let (rows, cols) = (w.rows, w.cols);
    let xt = transpose(x, n_tokens, cols);
    let pool = pool::global();
    let tile = tile_rows(rows, cols, pool.n_threads());
    let out = OutPtr(y.as_mut_ptr());
    pool.run(rows.div_ceil(tile), &|t| {
        let first = t * tile;
        let n = tile.min(rows - first);
        let mut scratch = vec![0f32; n * cols];
        decode_transposed(m, first, n, &mut scratch);
        // C (n_tokens × n) = A (x, stored column-major as xt) · B (scratch, cols × n
        // row-major), with C living inside y at column offset `first`, row stride `rows`.
        //
        // SAFETY: `xt` holds n_tokens × cols values and `scratch` cols × n, read with
        // in-bounds strides. C's elements are y[t * rows + first + j] for t < n_tokens,
        // j < n, all below n_tokens × rows = y.len() (checked by `matmul`); tiles have
        // disjoint `first..first + n`, so no two tasks write the same element, and `y`
        // is exclusively borrowed for the whole call. beta = 0 means C is not read.
        unsafe {
            matrixmultiply::sgemm(
                n_tokens,
                cols,
                n,
                1.0,
                xt.as_ptr(),
                1,
                n_tokens as isize,
                scratch.as_ptr(),
                n as isize,
                1,
                0.0,
                out.get().add(first),
                rows as isize,
                1,
            );
        }
    });
}

/// Rows decoded side by side by [`decode_transposed`], so each write to the transposed tile
/// is a contiguous run rather than one scattered value.
const TRANSPOSE_GROUP: usize = 8;

/// Decodes rows `first..first + n` of `w` into `out` transposed: `out[c * n + j]` is column
/// c of row `first + j`.
fn decode_transposed<W: EncodedRows>(m: &W, first: usize, n: usize, out: &mut [f32]) {
    let w = m.view();
    let decode = w.decode();
    let cols = w.cols;
    let piece_bytes = w.dtype.type_size() * (PIECE / w.dtype.block_size());
    let rb = w.row_bytes;
    let mut buf = [[0f32; PIECE]; TRANSPOSE_GROUP];
    let mut scratch = Vec::new();
    for j0 in (0..n).step_by(TRANSPOSE_GROUP) {
        let group = TRANSPOSE_GROUP.min(n - j0);
        let rows = m.rows(first + j0, group, &mut scratch);
        for start in (0..cols).step_by(PIECE) {
            let len = PIECE.min(cols - start);
            let p = start / PIECE;
            for (r, b) in buf[..group].iter_mut().enumerate() {
                let row = &rows[r * rb..(r + 1) * rb];
                let end = row.len().min((p + 1) * piece_bytes);
                decode(&row[p * piece_bytes..end], &mut b[..len]);
            }
            for i in 0..len {
                let dst = &mut out[(start + i) * n + j0..][..group];
                for (d, b) in dst.iter_mut().zip(&buf) {
                    *d = b[i];
                }
            }
        }
    }
}

/// `x` (n × m, row-major) transposed to m × n, in parallel over bands of output rows.
fn transpose(x: &[f32], n: usize, m: usize) -> Vec<f32> {
    // 16 output rows per band: each input row contributes one 64-byte line per band.
    const BAND: usize = 16;
    let mut xt = vec![0f32; n * m];
    pool::global().for_each_chunk_mut(&mut xt, BAND * n, &|b, band| {
        let c0 = b * BAND;
        let width = band.len() / n;
        for (t, xrow) in x.chunks_exact(m).enumerate() {
            for (k, &v) in xrow[c0..c0 + width].iter().enumerate() {
                band[k * n + t] = v;
            }
        }
    });
    xt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_type_blocks_and_length() {
        assert_eq!(
            WeightView::new(GgmlType::Q4_0, 2, 48, &[0u8; 72]).unwrap_err(),
            KernelError::NotBlockMultiple {
                dtype: GgmlType::Q4_0,
                n: 48
            }
        );
        assert_eq!(
            WeightView::new(GgmlType::Q4_0, 2, 64, &[0u8; 71]).unwrap_err(),
            KernelError::LengthMismatch {
                what: "weight matrix bytes",
                expected: 72,
                actual: 71
            }
        );
        assert_eq!(
            WeightView::new(GgmlType::I32, 1, 1, &[0u8; 4]).unwrap_err(),
            KernelError::UnsupportedType {
                dtype: GgmlType::I32,
                op: "weight matrix"
            }
        );
        assert!(matches!(
            WeightView::new(GgmlType::Q8_0, usize::MAX, 32, &[]),
            Err(KernelError::TooLarge { .. })
        ));
        let w = WeightView::new(GgmlType::Q4_0, 2, 64, &[0u8; 72]).unwrap();
        assert_eq!(
            (w.dtype(), w.rows(), w.cols(), w.row_bytes(), w.data().len()),
            (GgmlType::Q4_0, 2, 64, 36, 72)
        );
        assert_eq!(
            format!("{w:?}"),
            "WeightView { dtype: Q4_0, rows: 2, cols: 64, row_bytes: 36, data_len: 72 }"
        );
    }

    #[test]
    fn row_range_is_the_rows_it_names() {
        let bytes: Vec<u8> = (0..3 * 34).map(|i| (i % 7) as u8).collect();
        let w = WeightView::new(GgmlType::Q8_0, 3, 32, &bytes).unwrap();
        let part = w.row_range(1..3);
        assert_eq!((part.rows(), part.cols()), (2, 32));
        assert_eq!(part.data(), &bytes[34..]);
        let (mut a, mut b) = (vec![0.0; 32], vec![0.0; 32]);
        w.dequantize_row(2, &mut a);
        part.dequantize_row(1, &mut b);
        assert_eq!(a, b);
        assert_eq!(w.row_range(3..3).rows(), 0);
    }

    #[test]
    fn tiles_respect_the_size_budget_and_balance_threads() {
        let tile = |rows, cols| tile_rows(rows, cols, 2);
        // 1 MiB / 2560 B = 409 rows, capped at 256: 8 tiles, already even.
        assert_eq!(tile(2048, 640), 256);
        // 1 MiB / 8 KiB = 128 rows -> 5 tiles -> 6 (even) -> 107 rows -> 112.
        assert_eq!(tile(640, 2048), 112);
        assert_eq!(640usize.div_ceil(112), 6);
        // Few rows: split in two, rounded up to 8.
        assert_eq!(tile(37, 64), 24);
        assert_eq!(tile(1, 1), 8);
        // Enormous rows: the 64-row floor gives 3 tiles -> 4 -> 33 rows -> 40.
        assert_eq!(tile(130, 1 << 20), 40);
    }

    #[test]
    fn transposes_match_index_definitions() {
        let (n, m) = (5, 37);
        let x: Vec<f32> = (0..n * m).map(|i| i as f32).collect();
        let xt = transpose(&x, n, m);
        for t in 0..n {
            for c in 0..m {
                assert_eq!(xt[c * n + t], x[t * m + c]);
            }
        }

        // 11 rows (a short second group of 3) of 300 F32 columns (a short second piece).
        let (rows, cols) = (11, 300);
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = WeightView::new(GgmlType::F32, rows, cols, &bytes).unwrap();
        let (first, n) = (1, 10);
        let mut out = vec![0f32; cols * n];
        decode_transposed(&w, first, n, &mut out);
        for j in 0..n {
            for c in 0..cols {
                assert_eq!(
                    out[c * n + j],
                    vals[(first + j) * cols + c],
                    "row {j} col {c}"
                );
            }
        }
    }

    #[test]
    fn zero_tokens_or_rows_do_nothing() {
        let w = WeightView::new(GgmlType::F32, 0, 4, &[]).unwrap();
        matmul(&w, &[1.0; 8], 2, &mut []);
        let w = WeightView::new(GgmlType::F32, 3, 1, &[0u8; 12]).unwrap();
        matmul(&w, &[], 0, &mut []);
    }

    #[test]
    fn zero_columns_give_zero_sums_on_both_paths() {
        let w = WeightView::new(GgmlType::Q4_0, 3, 0, &[]).unwrap();
        for n_tokens in [1, 2, ROWWISE_MAX_TOKENS + 1] {
            let mut y = vec![f32::NAN; 3 * n_tokens];
            matmul(&w, &[], n_tokens, &mut y);
            assert_eq!(y, vec![0.0; 3 * n_tokens], "{n_tokens} tokens");
        }
    }

    #[test]
    #[should_panic(expected = "matmul: x has 7 values, expected n_tokens 2 × cols 4")]
    fn matmul_panics_on_bad_x() {
        let w = WeightView::new(GgmlType::F32, 1, 4, &[0u8; 16]).unwrap();
        matmul(&w, &[0.0; 7], 2, &mut [0.0; 2]);
    }

    #[test]
    #[should_panic(expected = "matmul: y has 3 values, expected n_tokens 2 × rows 1")]
    fn matmul_panics_on_bad_y() {
        let w = WeightView::new(GgmlType::F32, 1, 4, &[0u8; 16]).unwrap();
        matmul(&w, &[0.0; 8], 2, &mut [0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "dequantize_row: row 2 out of range for 2 rows")]
    fn dequantize_row_panics_past_the_end() {
        let w = WeightView::new(GgmlType::F32, 2, 1, &[0u8; 8]).unwrap();
        w.dequantize_row(2, &mut [0.0]);
    }
}
