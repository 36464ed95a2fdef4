//! The int4 matrix product of ONNX Runtime's `MatMulNBits` (4 bits, blocks of 32, symmetric, int8
//! compute), run on the model's own bytes with AVX-512 VNNI.
//!
//! Why not ONNX Runtime's: on the CPU, MLAS repacks the weights at load with a float block sum
//! beside every block's scale, so a decode step reads 1.2x the model's bytes, and its single-row
//! product stays below the memory's speed on 2 cores (README, "The bound"). Here a row of weights
//! is read once, in the file's layout, and every activation row of the call is multiplied with it
//! while it is in registers.
//!
//! The arithmetic is MLAS's `accuracy_level = 4`: each block of 32 activations is quantized to
//! int8 with the scale `max|x| / 127` (round half to even), multiplied with the 4-bit weights in
//! integers, and scaled by both blocks' scales in float. Only the order of the float sums differs.
//!
//! Layout of a row of weights (`MatMulNBits` input B): per block 16 bytes, weight `2j` in the low
//! nibble of byte `j`, weight `2j + 1` in the high one; the implicit zero point is 8. The
//! activations are split to match: the even and the odd elements of each block, so that one
//! 64-byte load of weights (4 blocks) meets two 64-byte loads of activations.

use std::ops::Range;

pub(crate) const BLOCK: usize = 32;
/// Blocks per 64-byte load of weights.
const CHUNK_BLOCKS: usize = 4;
/// int32 lanes of a 512-bit register per block (each lane sums 4 byte products).
const LANES_PER_BLOCK: usize = 4;

/// Whether this CPU runs the kernel (AVX-512 with VNNI: Intel since Ice Lake / Cascade Lake,
/// AMD since Zen 4).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A pointer that the tasks of ONNX Runtime's pool share in a custom kernel: they write
/// disjoint parts of what it points at, and end before the kernel returns.
#[derive(Clone, Copy)]
pub(crate) struct TaskPointer(pub *mut f32);
// SAFETY: see `TaskPointer`.
unsafe impl Send for TaskPointer {}
unsafe impl Sync for TaskPointer {}

/// One `MatMulNBits` weight, as the model stores it: `n` rows (outputs) of `k` inputs.
#[derive(Clone, Copy)]
pub(crate) struct Int4Weights<'a> {
    pub n: usize,
    pub k: usize,
    /// `n x blocks_per_row x 16` bytes.
    pub blocks: &'a [u8],
    /// `n x blocks_per_row` scales.
    pub scales: &'a [f32],
}

impl Int4Weights<'_> {
    pub fn blocks_per_row(&self) -> usize {
        self.k.div_ceil(BLOCK)
    }

    /// Whether the buffers hold what `n` and `k` say.
    pub fn consistent(&self) -> bool {
        let blocks = self.n.checked_mul(self.blocks_per_row());
        blocks.and_then(|b| b.checked_mul(BLOCK / 2)) == Some(self.blocks.len()) && blocks == Some(self.scales.len())
    }
}

/// Activation rows quantized per block of 32 to int8, in the kernel's layout. A row is padded
/// with zero blocks to whole chunks of 4 blocks, where it contributes nothing.
#[derive(Default)]
pub(crate) struct Activations {
    rows: usize,
    chunks: usize,
    /// Per row, per chunk: 64 bytes of the blocks' even elements.
    even: Vec<i8>,
    odd: Vec<i8>,
    /// Per row, per chunk, per lane: `-8 x` the sum of the lane's 8 activations, which removes
    /// the weights' zero point from the integer dot product.
    zero_point: Vec<i32>,
    /// Per row, per chunk, per lane: the scale of the lane's block.
    scales: Vec<f32>,
}

impl Activations {
    /// Quantizes `rows` rows of `k` values (`x` is `rows x k`, row-major).
    #[cfg(test)]
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Activations {
        let mut a = Activations::default();
        a.quantize_into(x, rows, k);
        a
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `quantize`, into this value's buffers (a decode step makes one product per weight: their
    /// allocations measured a tenth of the time on the compute-bound kjv-target).
    pub fn quantize_into(&mut self, x: &[f32], rows: usize, k: usize) {
        assert_eq!(x.len(), rows * k, "activations are rows x k");
        let chunks = k.div_ceil(BLOCK * CHUNK_BLOCKS);
        let lanes = chunks * CHUNK_BLOCKS * LANES_PER_BLOCK;
        let half = chunks * CHUNK_BLOCKS * BLOCK / 2;
        let a = self;
        a.rows = rows;
        a.chunks = chunks;
        for (buffer, len) in [(&mut a.even, rows * half), (&mut a.odd, rows * half)] {
            buffer.clear();
            buffer.resize(len, 0);
        }
        a.zero_point.clear();
        a.zero_point.resize(rows * lanes, 0);
        a.scales.clear();
        a.scales.resize(rows * lanes, 0.0);
        for r in 0..rows {
            let row = &x[r * k..(r + 1) * k];
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                let inverse = if max != 0.0 { 127.0 / max } else { 0.0 };
                let mut q = [0i8; BLOCK];
                for (q, v) in q.iter_mut().zip(block) {
                    *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
                let base = r * half + b * BLOCK / 2;
                for j in 0..BLOCK / 2 {
                    a.even[base + j] = q[2 * j];
                    a.odd[base + j] = q[2 * j + 1];
                }
                for lane in 0..LANES_PER_BLOCK {
                    let sum: i32 = q[lane * 8..lane * 8 + 8].iter().map(|&v| i32::from(v)).sum();
                    a.zero_point[r * lanes + b * LANES_PER_BLOCK + lane] = -8 * sum;
                    a.scales[r * lanes + b * LANES_PER_BLOCK + lane] = scale;
                }
            }
        }
    }
}

/// `out[r][i] = sum_k x[r][k] * w[i][k]` for the weight rows `rows` and every activation row `r`
/// (`out` is `a.rows() x w.n`, row-major). Threads may run disjoint `rows` of one product.
///
/// # Safety
/// `supported()` is true; `out` points at `a.rows() x w.n` floats that nothing else writes at the
/// columns `rows`; `w.consistent()`; `a` was quantized with `k = w.k`; `rows.end <= w.n`.
pub(crate) unsafe fn matmul_rows(w: &Int4Weights, a: &Activations, rows: Range<usize>, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        avx512::matmul_rows(w, a, rows, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("int4::supported() is false off x86_64 ({w:p}, {a:p}, {rows:?}, {out:p})", w = w, a = a);
}

/// The whole product on the calling thread; `out` is `rows x w.n`.
#[cfg(test)]
pub(crate) fn matmul(w: &Int4Weights, a: &Activations, out: &mut [f32]) {
    assert!(supported(), "the int4 kernel needs AVX-512 VNNI");
    assert!(w.consistent() && a.chunks == w.k.div_ceil(BLOCK * CHUNK_BLOCKS) && out.len() == a.rows * w.n);
    // SAFETY: checked just above; `out` is borrowed mutably.
    unsafe { matmul_rows(w, a, 0..w.n, out.as_mut_ptr()) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Activations, Int4Weights, BLOCK, CHUNK_BLOCKS, LANES_PER_BLOCK};

    /// Activation rows per pass over the weights: their accumulators stay in registers with the
    /// four weight rows' (3 x 4 sums, 4 x 3 weight registers, 4 activation registers: 28 of 32).
    const ROW_TILE: usize = 3;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn matmul_rows(w: &Int4Weights, a: &Activations, rows: Range<usize>, out: *mut f32) {
        // Four weight rows at a time share the activation loads. They are taken from the four
        // quarters of `rows`, so that each quarter is read as one long sequential stream, which
        // the hardware prefetcher follows (adjacent rows interleaved measured at half the speed);
        // four against two: 2.7-4.1 ms less for 2-9 activation rows over the twin's 377 MB.
        let quarter = (rows.end - rows.start) / 4;
        let tiles = a.rows.div_ceil(ROW_TILE);
        let mut first = 0;
        for t in 0..tiles {
            // Tiles of even size: 4 rows as 2 + 2, not 3 + 1.
            let tile = (a.rows - first).div_ceil(tiles - t);
            for i in 0..quarter {
                let rows = [rows.start + i, rows.start + quarter + i, rows.start + 2 * quarter + i, rows.start + 3 * quarter + i];
                // SAFETY: the caller's contract, for a sub-range of its rows.
                unsafe {
                    match tile {
                        1 => product::<4, 1>(w, a, first, rows, out),
                        2 => product::<4, 2>(w, a, first, rows, out),
                        _ => product::<4, 3>(w, a, first, rows, out),
                    }
                }
            }
            for row in rows.start + 4 * quarter..rows.end {
                // SAFETY: as above.
                unsafe {
                    match tile {
                        1 => product::<1, 1>(w, a, first, [row], out),
                        2 => product::<1, 2>(w, a, first, [row], out),
                        _ => product::<1, 3>(w, a, first, [row], out),
                    }
                }
            }
            first += tile;
        }
    }

    /// Where one product's operands are.
    struct Chunk<'a, const WR: usize> {
        a: &'a Activations,
        first: usize,
        half: usize,
        lanes: usize,
        weights: [*const u8; WR],
        scales: [*const f32; WR],
    }

    impl<const WR: usize> Chunk<'_, WR> {
        /// Adds chunk `c` (4 blocks; the masks select the blocks that exist) to the sums.
        #[inline(always)]
        unsafe fn add<const MT: usize>(&self, sums: &mut [[__m512; MT]; WR], c: usize, byte_mask: u64, scale_mask: u8) {
            // SAFETY: `product`'s bounds.
            unsafe {
                let nibble = _mm512_set1_epi8(0x0f);
                let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
                let mut low = [_mm512_setzero_si512(); WR];
                let mut high = [_mm512_setzero_si512(); WR];
                let mut scale = [_mm512_setzero_ps(); WR];
                for i in 0..WR {
                    let v = _mm512_maskz_loadu_epi8(byte_mask, self.weights[i].add(c * 64).cast());
                    low[i] = _mm512_and_si512(v, nibble);
                    high[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                    let s = _mm_maskz_loadu_ps(scale_mask, self.scales[i].add(c * CHUNK_BLOCKS));
                    scale[i] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s));
                }
                let a = self.a;
                for r in 0..MT {
                    let row = self.first + r;
                    let even = _mm512_loadu_si512(a.even.as_ptr().add(row * self.half + c * 64).cast());
                    let odd = _mm512_loadu_si512(a.odd.as_ptr().add(row * self.half + c * 64).cast());
                    let zero_point = _mm512_loadu_si512(a.zero_point.as_ptr().add(row * self.lanes + c * 16).cast());
                    let x_scale = _mm512_loadu_ps(a.scales.as_ptr().add(row * self.lanes + c * 16));
                    for i in 0..WR {
                        let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero_point, low[i], even), high[i], odd);
                        sums[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale[i], x_scale), sums[i][r]);
                    }
                }
            }
        }
    }

    /// `WR` weight rows against activation rows `first..first + MT`.
    #[inline(always)]
    unsafe fn product<const WR: usize, const MT: usize>(w: &Int4Weights, a: &Activations, first: usize, rows: [usize; WR], out: *mut f32) {
        let blocks_per_row = w.blocks_per_row();
        let whole = blocks_per_row / CHUNK_BLOCKS;
        let tail = blocks_per_row % CHUNK_BLOCKS;
        let half = a.chunks * CHUNK_BLOCKS * BLOCK / 2;
        let lanes = a.chunks * CHUNK_BLOCKS * LANES_PER_BLOCK;
        // SAFETY (whole function): pointers stay inside the weights (whole chunks, then masked
        // loads of the tail's blocks only) and inside the activations (padded to whole chunks).
        unsafe {
            let weights: [*const u8; WR] = std::array::from_fn(|i| w.blocks.as_ptr().add(rows[i] * blocks_per_row * BLOCK / 2));
            let scales: [*const f32; WR] = std::array::from_fn(|i| w.scales.as_ptr().add(rows[i] * blocks_per_row));
            let mut sums = [[_mm512_setzero_ps(); MT]; WR];
            let chunk = Chunk { a, first, half, lanes, weights, scales };
            for c in 0..whole {
                chunk.add::<MT>(&mut sums, c, u64::MAX, 0x0f);
            }
            if tail > 0 {
                chunk.add::<MT>(&mut sums, whole, (1u64 << (tail * BLOCK / 2)) - 1, (1u8 << tail) - 1);
            }
            for i in 0..WR {
                for r in 0..MT {
                    *out.add((first + r) * w.n + rows[i]) = _mm512_reduce_add_ps(sums[i][r]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product as MatMulNBits defines it with int8 activations, one value at a time.
    fn reference(w: &Int4Weights, x: &[f32], rows: usize) -> Vec<f32> {
        let blocks = w.blocks_per_row();
        let mut out = vec![0f32; rows * w.n];
        for r in 0..rows {
            let row = &x[r * w.k..(r + 1) * w.k];
            for n in 0..w.n {
                let mut sum = 0f64;
                for (b, block) in row.chunks(BLOCK).enumerate() {
                    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let inverse = if max != 0.0 { 127.0 / max } else { 0.0 };
                    let mut dot = 0i64;
                    for (j, v) in block.iter().enumerate() {
                        let byte = w.blocks[(n * blocks + b) * BLOCK / 2 + j / 2];
                        let q = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                        dot += (i64::from(q) - 8) * ((v * inverse).round_ties_even() as i64);
                    }
                    sum += dot as f64 * f64::from(w.scales[n * blocks + b]) * f64::from(max / 127.0);
                }
                out[r * w.n + n] = sum as f32;
            }
        }
        out
    }

    fn random(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Every shape class the kernel branches on: weight rows in quarters and 0-3 left over, 1-9 activation rows
    /// (tiles of 1-3), whole chunks and 1-3 tail blocks, a partial last block.
    #[test]
    fn the_kernel_equals_the_definition_on_every_branch() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for (n, k, rows) in
            [(7usize, 128usize, 1usize), (8, 160, 2), (5, 192, 3), (6, 224, 4), (9, 256, 5), (4, 100, 9), (3, 32, 1), (1, 64, 2)]
        {
            let blocks = k.div_ceil(BLOCK);
            let bytes: Vec<u8> = (0..n * blocks * BLOCK / 2).map(|_| random(&mut seed) as u8).collect();
            let scales: Vec<f32> = (0..n * blocks).map(|_| (random(&mut seed) % 1000) as f32 / 1e4 + 1e-3).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| (random(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
            let w = Int4Weights { n, k, blocks: &bytes, scales: &scales };
            let want = reference(&w, &x, rows);
            let mut got = vec![f32::NAN; rows * n];
            matmul(&w, &Activations::quantize(&x, rows, k), &mut got);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "n {n} k {k} rows {rows}: element {i} is {g}, the definition gives {e}");
            }
        }
    }
}
