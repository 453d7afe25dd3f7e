//! Exact area-average resampling (OpenCV `INTER_AREA` semantics) in integer
//! arithmetic.
//!
//! Output pixel `o` covers the source interval `[o·in/out, (o+1)·in/out)` on
//! each axis; every source pixel contributes in proportion to how much of it
//! lies inside, including fractional coverage at both ends. Working in units
//! of `1/out` source pixels makes every coverage an integer, so the result is
//! the exactly rounded mean: no fixed-point weight error.
//!
//! `fast_image_resize`'s `Box` filter is not this: it gives each source pixel
//! whose *center* falls in the footprint a full weight, which is close enough
//! at 30× but off by several levels at the 4–8× ratios left after a DCT-scaled
//! JPEG decode.

/// Tallest source the u32 row accumulator supports (255 * rows must fit).
pub(crate) const MAX_HEIGHT: u64 = (u32::MAX / 255) as u64;

/// One output pixel's source span on an axis: `first` source index and the
/// integer coverage of each source pixel from there on.
struct Span {
    first: usize,
    weights: Vec<u32>,
}

/// Coverage spans for resampling `n_in` pixels to `n_out` on one axis. The
/// weights of every span sum to `n_in`.
fn spans(n_in: usize, n_out: usize) -> Vec<Span> {
    (0..n_out)
        .map(|o| {
            // Output o covers [o*n_in, (o+1)*n_in); source i covers [i*n_out, (i+1)*n_out).
            let (lo, hi) = (o * n_in, (o + 1) * n_in);
            let first = lo / n_out;
            let last = (hi - 1) / n_out; // inclusive
            let weights = (first..=last)
                .map(|i| {
                    let (a, b) = (i * n_out, (i + 1) * n_out);
                    (b.min(hi) - a.max(lo)) as u32
                })
                .collect();
            Span { first, weights }
        })
        .collect()
}

/// Resamples `src` (`w`×`h`×`ch` HWC u8) to `out_w`×`out_h` by exact area
/// averaging. All sizes must be non-zero, `h <= MAX_HEIGHT` and
/// `src.len() == w*h*ch`.
pub(crate) fn resize(
    src: &[u8],
    w: usize,
    h: usize,
    ch: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), w * h * ch);
    let row_len = w * ch;
    let (cols, rows) = (spans(w, out_w), spans(h, out_h));
    let total = (w as u64) * (h as u64);
    let mut out = Vec::with_capacity(out_w * out_h * ch);
    // One weighted row sum per output row: acc[x] = sum_j v_j * src[j][x].
    // v_j <= out_h and sum v_j = h, so acc <= 255 * h fits u32 for any h < 2^24.
    let mut acc = vec![0u32; row_len];
    for span in &rows {
        acc.fill(0);
        for (k, &v) in span.weights.iter().enumerate() {
            let start = (span.first + k) * row_len;
            let row = &src[start..start + row_len];
            // Contiguous multiply-add: the compiler vectorizes this loop.
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += v * u32::from(p);
            }
        }
        for col in &cols {
            for c in 0..ch {
                let mut sum = 0u64;
                for (k, &wgt) in col.weights.iter().enumerate() {
                    sum += u64::from(wgt) * u64::from(acc[(col.first + k) * ch + c]);
                }
                // Rounded division; the mean is <= 255 by construction.
                out.push(((sum + total / 2) / total) as u8);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_exactly() {
        for (n_in, n_out) in [
            (1920, 32),
            (135, 32),
            (7, 3),
            (3, 7),
            (32, 32),
            (1, 5),
            (5, 1),
        ] {
            for s in spans(n_in, n_out) {
                assert_eq!(
                    s.weights.iter().sum::<u32>() as usize,
                    n_in,
                    "{n_in}->{n_out}"
                );
                assert!(s.first + s.weights.len() <= n_in);
            }
        }
    }

    #[test]
    fn integer_ratio_is_block_mean() {
        // 4x2 gray -> 2x1: means of the two 2x2 blocks.
        let src = [0u8, 10, 100, 200, 20, 30, 50, 250];
        assert_eq!(resize(&src, 4, 2, 1, 2, 1), vec![15, 150]);
    }

    #[test]
    fn fractional_coverage() {
        // 3 px -> 2 px: out0 = (1*a + 0.5*b)/1.5, out1 = (0.5*b + 1*c)/1.5.
        let src = [0u8, 90, 180];
        assert_eq!(resize(&src, 3, 1, 1, 2, 1), vec![30, 150]);
    }

    #[test]
    fn identity_and_constant() {
        let src: Vec<u8> = (0..48).map(|i| (i * 5) as u8).collect();
        assert_eq!(resize(&src, 4, 4, 3, 4, 4), src);
        let flat = vec![77u8; 50 * 30 * 3];
        assert!(resize(&flat, 50, 30, 3, 7, 5).iter().all(|&p| p == 77));
    }
}
