//! The int4 matrix product of ONNX Runtime's `MatMulNBits` (4 bits, blocks of 32, symmetric, int8
//! compute), with AVX-512 VNNI, on a copy of the weights packed for it at load.
//!
//! Why not ONNX Runtime's: on the CPU, MLAS repacks the weights at load with a float block sum
//! beside every block's scale, so a decode step reads 1.2x the model's bytes, and its single-row
//! product stays below the memory's speed on 2 cores (docs/performance.md, "The memory-bound twin in detail").
//!
//! The arithmetic is MLAS's `accuracy_level = 4`: each block of 32 activations is quantized to
//! int8 with the scale `max|x| / 127` (round half to even), multiplied with the 4-bit weights in
//! integers, and scaled by both blocks' scales in float. Only the order of the float sums differs.
//!
//! The packed layout puts 16 weight rows side by side, one per 32-bit lane: a VNNI dot product
//! multiplies four weights of each of the 16 rows with the same four activations, broadcast from
//! memory. A block of 16 rows is 8 such products, and its float work (one convert, one multiply of
//! the scales, one FMA) is shared by 512 weights; in the model's own layout, where a register held
//! four blocks of one row, it was shared by 128, and each row's sum ended in a horizontal add. A
//! group of 16 rows is read once per call, whatever the number of activation rows, and prefetched
//! ahead, so that reading it overlaps the arithmetic on the group before: a verify's several
//! activation rows cost little more than one row, where the model's layout costs much more.
//!
//! Packed layout, per group of `w` rows (16, fewer in the last group) and per block, the group's
//! blocks in order: four vectors of `4w` bytes, then `w` scales. In vector `m`, lane `l` holds row
//! `l`'s weights `4m..4m + 4` in its bytes' low nibbles and weights `16 + 4m..16 + 4m + 4` in the
//! high ones. The model's layout: per row and block 16 bytes, weight `2j` in the low nibble of byte
//! `j`, weight `2j + 1` in the high one; the implicit zero point is 8.

use std::ops::Range;

pub(crate) const BLOCK: usize = 32;
/// Weight rows per 512-bit register, one per int32 lane.
pub(crate) const GROUP: usize = 16;
/// Activation rows per pass over a group: their sums stay in registers beside the group's 8
/// weight registers and the scales (16 + 8 + 1 + 4 temporaries of 32).
const MAX_TILE: usize = 16;
/// How far ahead of the block being multiplied its group's stream is prefetched (anywhere from 1
/// to 8 KiB serves alike); without it, reading and arithmetic take turns.
const PREFETCH_BYTES: usize = 2048;

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

/// A weight in the kernel's layout (see the module's text): as many bytes as the model's.
pub(crate) struct PackedWeights {
    n: usize,
    k: usize,
    blocks_per_row: usize,
    bytes: Vec<u8>,
    scales: Vec<f32>,
}

impl PackedWeights {
    /// Packs consistent weights (`Int4Weights::consistent`).
    pub fn pack(w: &Int4Weights) -> PackedWeights {
        assert!(w.consistent(), "int4 weights of {} x {} with {} bytes and {} scales", w.n, w.k, w.blocks.len(), w.scales.len());
        let blocks_per_row = w.blocks_per_row();
        let mut bytes = vec![0u8; w.blocks.len()];
        let mut scales = vec![0f32; w.scales.len()];
        for first in (0..w.n).step_by(GROUP) {
            let width = GROUP.min(w.n - first);
            let group_bytes = &mut bytes[first * blocks_per_row * BLOCK / 2..][..width * blocks_per_row * BLOCK / 2];
            let group_scales = &mut scales[first * blocks_per_row..][..width * blocks_per_row];
            for lane in 0..width {
                let row = first + lane;
                for b in 0..blocks_per_row {
                    let source = &w.blocks[(row * blocks_per_row + b) * BLOCK / 2..][..BLOCK / 2];
                    let weight = |j: usize| (source[j / 2] >> (4 * (j % 2))) & 0x0f;
                    let block = &mut group_bytes[b * width * BLOCK / 2..][..width * BLOCK / 2];
                    for m in 0..4 {
                        for t in 0..4 {
                            block[m * 4 * width + 4 * lane + t] = weight(4 * m + t) | weight(16 + 4 * m + t) << 4;
                        }
                    }
                    group_scales[b * width + lane] = w.scales[row * blocks_per_row + b];
                }
            }
        }
        PackedWeights { n: w.n, k: w.k, blocks_per_row, bytes, scales }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Groups of `GROUP` rows, the unit of `matmul_groups`.
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }
}

/// Activation rows quantized per block of 32 to int8 (the last block padded with zeros).
#[derive(Default)]
pub(crate) struct Activations {
    rows: usize,
    blocks_per_row: usize,
    /// Per row, per block: 32 values in order.
    values: Vec<i8>,
    /// Per row, per block: `-8 x` the sum of its values, which removes the weights' zero point
    /// from the integer dot product.
    zero_point: Vec<i32>,
    /// Per row, per block: the scale.
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
    /// allocations would be a visible part of a small model's step).
    pub fn quantize_into(&mut self, x: &[f32], rows: usize, k: usize) {
        assert_eq!(x.len(), rows * k, "activations are rows x k");
        let blocks_per_row = k.div_ceil(BLOCK);
        let a = self;
        a.rows = rows;
        a.blocks_per_row = blocks_per_row;
        a.values.clear();
        a.values.resize(rows * blocks_per_row * BLOCK, 0);
        a.zero_point.clear();
        a.zero_point.resize(rows * blocks_per_row, 0);
        a.scales.clear();
        a.scales.resize(rows * blocks_per_row, 0.0);
        let wide = supported();
        for r in 0..rows {
            for (b, block) in x[r * k..(r + 1) * k].chunks(BLOCK).enumerate() {
                let at = r * blocks_per_row + b;
                let values = &mut a.values[at * BLOCK..][..block.len()];
                let (max, sum) = match <&[f32; BLOCK]>::try_from(block) {
                    // SAFETY: `supported()` is true.
                    #[cfg(target_arch = "x86_64")]
                    Ok(whole) if wide => unsafe { avx512::quantize_block(whole, values) },
                    _ => quantize_block(block, values),
                };
                a.zero_point[at] = -8 * sum;
                a.scales[at] = max / 127.0;
            }
        }
    }
}

/// Quantizes a block into `values`; returns its largest magnitude and the sum of its values.
/// The vector version (a decode step quantizes every product's input, a visible share of a
/// forward's time in the scalar loop) computes the same values.
fn quantize_block(block: &[f32], values: &mut [i8]) -> (f32, i32) {
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inverse = if max != 0.0 { 127.0 / max } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in values.iter_mut().zip(block) {
        *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += i32::from(*q);
    }
    (max, sum)
}

/// `out[r][i] = sum_k x[r][k] * w[i][k]` for the weight rows of `groups` (of `GROUP` rows) and
/// every activation row `r` (`out` is `a.rows() x w.n()`, row-major). Threads may run disjoint
/// `groups` of one product.
///
/// # Safety
/// `supported()` is true; `out` points at `a.rows() x w.n()` floats that nothing else writes at
/// the columns of `groups`; `a` was quantized with `k = w.k()`; `groups.end <= w.groups()`.
pub(crate) unsafe fn matmul_groups(w: &PackedWeights, a: &Activations, groups: Range<usize>, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        avx512::matmul_groups(w, a, groups, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("int4::supported() is false off x86_64 ({w:p}, {a:p}, {groups:?}, {out:p})", w = w, a = a);
}

/// The whole product on the calling thread; `out` is `rows x w.n`.
#[cfg(test)]
pub(crate) fn matmul(w: &PackedWeights, a: &Activations, out: &mut [f32]) {
    assert!(supported(), "the int4 kernel needs AVX-512 VNNI");
    assert!(a.blocks_per_row == w.blocks_per_row && out.len() == a.rows * w.n);
    // SAFETY: checked just above; `out` is borrowed mutably.
    unsafe { matmul_groups(w, a, 0..w.groups(), out.as_mut_ptr()) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Activations, PackedWeights, BLOCK, GROUP, MAX_TILE, PREFETCH_BYTES};

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn matmul_groups(w: &PackedWeights, a: &Activations, groups: Range<usize>, out: *mut f32) {
        let tiles = a.rows.div_ceil(MAX_TILE);
        for group in groups {
            // The group's weights stay in the caches between tiles (a prefill's many rows).
            let mut first = 0;
            for t in 0..tiles {
                // Tiles of even size: 17 rows as 9 + 8, not 16 + 1.
                let tile = (a.rows - first).div_ceil(tiles - t);
                macro_rules! by_tile {
                    ($($rows:literal)*) => {
                        match tile {
                            // SAFETY: the caller's contract, for one group and rows `first..first + tile`.
                            $($rows => unsafe { product::<$rows>(w, a, group, first, out) },)*
                            _ => unreachable!("tiles have 1 to {MAX_TILE} rows"),
                        }
                    };
                }
                by_tile!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
                first += tile;
            }
        }
    }

    /// `super::quantize_block` for a whole block. The conversion rounds half to even (the
    /// default rounding mode), the magnitudes are at most 127 but for rounding up, so the clamp
    /// after it is the scalar's clamp before.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_block(block: &[f32; BLOCK], values: &mut [i8]) -> (f32, i32) {
        assert_eq!(values.len(), BLOCK);
        // SAFETY: 32 floats read and 32 bytes written, in bounds.
        unsafe {
            let low = _mm512_loadu_ps(block.as_ptr());
            let high = _mm512_loadu_ps(block.as_ptr().add(16));
            let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
            let inverse = _mm512_set1_ps(if max != 0.0 { 127.0 / max } else { 0.0 });
            let (least, most) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            let round = |v| _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)), least), most);
            let (low, high) = (round(low), round(high));
            _mm_storeu_si128(values.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(low));
            _mm_storeu_si128(values.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(high));
            (max, _mm512_reduce_add_epi32(_mm512_add_epi32(low, high)))
        }
    }

    /// One group of weight rows against activation rows `first..first + MT`.
    #[inline(always)]
    unsafe fn product<const MT: usize>(w: &PackedWeights, a: &Activations, group: usize, first: usize, out: *mut f32) {
        let blocks_per_row = w.blocks_per_row;
        let row0 = group * GROUP;
        let width = GROUP.min(w.n - row0);
        let byte_mask: u64 = if width == GROUP { u64::MAX } else { (1u64 << (4 * width)) - 1 };
        let lane_mask: u16 = if width == GROUP { u16::MAX } else { (1u16 << width) - 1 };
        // SAFETY (whole function): the group's bytes and scales are inside the packed weights
        // (masked loads read only its `width` lanes), the activation rows exist (the caller's
        // contract), prefetches do not fault, and each row's store covers the group's columns.
        unsafe {
            let bytes = w.bytes.as_ptr().add(row0 * blocks_per_row * BLOCK / 2);
            let scales = w.scales.as_ptr().add(row0 * blocks_per_row);
            let nibble = _mm512_set1_epi8(0x0f);
            let mut sums = [_mm512_setzero_ps(); MT];
            for b in 0..blocks_per_row {
                let block = bytes.add(b * width * BLOCK / 2);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_BYTES + 64 * line).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(scales.add(b * width).cast::<i8>().wrapping_add(PREFETCH_BYTES / 4));
                let mut weights = [_mm512_setzero_si512(); 8];
                for m in 0..4 {
                    let v = _mm512_maskz_loadu_epi8(byte_mask, block.add(m * 4 * width).cast());
                    weights[m] = _mm512_and_si512(v, nibble);
                    weights[m + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                }
                let weight_scales = _mm512_maskz_loadu_ps(lane_mask, scales.add(b * width));
                for (r, sum) in sums.iter_mut().enumerate() {
                    let at = (first + r) * blocks_per_row + b;
                    let quads = a.values.as_ptr().add(at * BLOCK).cast::<i32>();
                    // Two chains of four, so that one row does not wait on a chain of eight.
                    let mut low = _mm512_set1_epi32(*a.zero_point.as_ptr().add(at));
                    let mut high = _mm512_setzero_si512();
                    for m in 0..4 {
                        low = _mm512_dpbusd_epi32(low, weights[m], _mm512_set1_epi32(quads.add(m).read_unaligned()));
                        high = _mm512_dpbusd_epi32(high, weights[m + 4], _mm512_set1_epi32(quads.add(4 + m).read_unaligned()));
                    }
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(low, high));
                    let scale = _mm512_mul_ps(weight_scales, _mm512_set1_ps(*a.scales.as_ptr().add(at)));
                    *sum = _mm512_fmadd_ps(dot, scale, *sum);
                }
            }
            for (r, sum) in sums.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add((first + r) * w.n + row0), lane_mask, *sum);
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

    /// The vector quantization gives the scalar's bytes, sum and scale: random blocks, blocks of
    /// exact halves after scaling (ties), a block of zeros and one of a single value.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_vector_quantization_is_the_scalar_one() {
        if !supported() {
            return crate::skipped::report("runtime::int4::tests::the_vector_quantization_is_the_scalar_one", "this CPU has no AVX-512 VNNI");
        }
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let mut blocks: Vec<[f32; BLOCK]> =
            (0..500).map(|i| std::array::from_fn(|_| ((random(&mut seed) % 20001) as f32 / 1000.0 - 10.0) * (1 + i % 7) as f32)).collect();
        // max 127: every value an integer plus a half is a tie.
        blocks.push(std::array::from_fn(|j| if j == 0 { 127.0 } else { j as f32 - 15.5 }));
        blocks.push([0.0; BLOCK]);
        blocks.push([-3.25; BLOCK]);
        for block in &blocks {
            let (mut scalar, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            let want = quantize_block(block, &mut scalar);
            // SAFETY: `supported()` is true.
            let got = unsafe { avx512::quantize_block(block, &mut vector) };
            assert_eq!((got.0.to_bits(), got.1, vector), (want.0.to_bits(), want.1, scalar), "{block:?}");
        }
    }

    /// Every shape class the kernel branches on: whole groups of 16 weight rows and a last group
    /// of 1-15, 1-16 activation rows in one tile and more in several, a partial last block.
    #[test]
    fn the_kernel_equals_the_definition_on_every_branch() {
        if !supported() {
            return crate::skipped::report("runtime::int4::tests::the_kernel_equals_the_definition_on_every_branch", "this CPU has no AVX-512 VNNI");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for (n, k, rows) in [
            (7usize, 128usize, 1usize),
            (16, 160, 2),
            (35, 192, 3),
            (48, 224, 16),
            (9, 256, 5),
            (33, 100, 9),
            (3, 32, 17),
            (1, 64, 2),
            (20, 96, 40),
        ] {
            let blocks = k.div_ceil(BLOCK);
            let bytes: Vec<u8> = (0..n * blocks * BLOCK / 2).map(|_| random(&mut seed) as u8).collect();
            let scales: Vec<f32> = (0..n * blocks).map(|_| (random(&mut seed) % 1000) as f32 / 1e4 + 1e-3).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| (random(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
            let w = Int4Weights { n, k, blocks: &bytes, scales: &scales };
            let want = reference(&w, &x, rows);
            let mut got = vec![f32::NAN; rows * n];
            matmul(&PackedWeights::pack(&w), &Activations::quantize(&x, rows, k), &mut got);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "n {n} k {k} rows {rows}: element {i} is {g}, the definition gives {e}");
            }
        }
    }
}
