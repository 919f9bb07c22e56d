//! Intel AMX tile products (`TDPBF16PS`: bf16 x bf16 pairs summed into f32 tiles), the engine of
//! the packed bf16 weights in [`crate::kernels::cpu::bf16_matmul`].
//!
//! [`available`] says whether this process may use the tiles (CPUID leaf 7: AMX-TILE and
//! AMX-BF16; then Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once).
//! [`product_rows`] is the product of 32-row blocks of bf16 activations with a weight packed as
//! [`TILE_ELEMS`]-element tiles: tile `(j, t)` (output columns `16 j..16 j + 16`, inputs
//! `32 t..32 t + 32`) at `(j * k_tiles + t) * TILE_ELEMS` ([`TileOrder::ByColumns`]) or
//! `(t * n_tiles + j) * TILE_ELEMS` ([`TileOrder::ByInputs`]), row `r` of a tile holding, for
//! each of its 16 columns `c`, the pair `(W[c, 32 t + 2 r], W[c, 32 t + 2 r + 1])` (the layout
//! `TDPBF16PS` reads its second operand in). Nothing here allocates or threads: the caller splits
//! rows over the pool.

use std::arch::asm;
use std::sync::OnceLock;

/// bf16 elements in one packed weight tile (16 rows of 64 bytes).
pub const TILE_ELEMS: usize = 512;
/// Output rows of one block of [`product_rows`] (two 16-row tiles).
pub const BLOCK_ROWS: usize = 32;
/// Output columns of one block (two 16-column tiles).
pub const BLOCK_COLS: usize = 32;
/// Inputs (bf16 elements) per tile step.
pub const K_STEP: usize = 32;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use the tiles,
/// unless the environment variable `RETORT_AMX` is `0` (to time or check the other way).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("RETORT_AMX").map_or(true, |v| v != "0") && cpu_has_amx_bf16() && tile_data_permitted()
    })
}

fn cpu_has_amx_bf16() -> bool {
    // Leaf 7 means something only on CPUs whose highest leaf is at least 7.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    edx & AMX_BF16 != 0 && edx & AMX_TILE != 0
}

#[cfg(target_os = "linux")]
fn tile_data_permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: `arch_prctl` with these arguments only asks the kernel to let the process use the
    // tile state; it returns -1 (and touches nothing) where the kernel or CPU refuses.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn tile_data_permitted() -> bool {
    false
}

/// The tile configuration `ldtilecfg` reads (palette 1): tiles 0-7 all 16 rows of 64 bytes,
/// tiles 8-15 (which palette 1 does not have) zero, as the instruction requires.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The order of a packed weight's tiles (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileOrder {
    /// Each column tile's tiles together, inputs ascending.
    ByColumns,
    /// Each input tile's tiles together, columns ascending.
    ByInputs,
}

impl TileOrder {
    /// Elements from one column tile to the next, and from one input tile to the next, of an
    /// `[n, k]` weight.
    pub fn strides(self, n: usize, k: usize) -> (usize, usize) {
        match self {
            TileOrder::ByColumns => ((k / K_STEP) * TILE_ELEMS, TILE_ELEMS),
            TileOrder::ByInputs => (TILE_ELEMS, (n / 16) * TILE_ELEMS),
        }
    }
}

/// Tile steps (of [`K_STEP`] inputs) per pass of [`product_rows`] over the output: the row
/// block's activations for one pass (32 rows x 2,048 bf16, 128 KiB) and a column tile pair's
/// weights (64 KiB) stay in the core's L2 while the pass sweeps the columns.
const K_TILES_PER_PASS: usize = 64;

/// `y [rows, n] (+)= x [rows, k] @ W^T` for bf16 rows `x` (row stride `k`, `k` a multiple of
/// [`K_STEP`]), the packed weight `tiles` (`n / 16` column tiles of `k / 32` tiles each, in
/// `order`, `n` a multiple of [`BLOCK_COLS`]) and f32 rows `y` (row stride `n`), `rows` a multiple of
/// [`BLOCK_ROWS`]; the products are added onto `y` when `accumulate`, else `y` is overwritten
/// (and never read). Runs on the calling thread.
///
/// # Panics
/// When AMX is not [`available`] or the slices do not have these shapes.
pub fn product_rows(
    x: &[u16],
    k: usize,
    (tiles, order): (&[u16], TileOrder),
    n: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(available(), "AMX tile products on a CPU without them");
    assert!(
        k > 0 && k.is_multiple_of(K_STEP) && n > 0 && n.is_multiple_of(BLOCK_COLS),
        "amx: k {k}, n {n}"
    );
    let rows = x.len() / k;
    assert!(
        x.len() == rows * k && rows.is_multiple_of(BLOCK_ROWS) && y.len() == rows * n && tiles.len() == n * k,
        "amx: operand sizes"
    );
    let k_tiles = k / K_STEP;
    let (col_stride, input_stride) = order.strides(n, k);
    // SAFETY: AMX is available and permitted (checked above); the configuration is valid for
    // palette 1. Every tile load below reads 16 rows of 64 bytes inside `x` or `tiles` and
    // every tile load or store of `y` touches 16 rows of 64 bytes inside `y`: block rows
    // `r0..r0 + 32` < rows with row stride `k` (x, bf16) and `n` (y, f32), columns
    // `c0..c0 + 32` <= n, tile steps `t0..t0 + steps` <= k_tiles; tile `(j, t)` starts at
    // `j * col_stride + t * input_stride`, which for either order, `j < n / 16` and
    // `t < k_tiles` is at most `n * k - TILE_ELEMS` (sizes asserted above). `tilerelease` leaves the tile
    // state as it was found (initial).
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
        for t0 in (0..k_tiles).step_by(K_TILES_PER_PASS) {
            let steps = K_TILES_PER_PASS.min(k_tiles - t0);
            let load = accumulate || t0 > 0;
            for c0 in (0..n).step_by(BLOCK_COLS) {
                let w0 = tiles.as_ptr().add((c0 / 16) * col_stride + t0 * input_stride);
                let w1 = w0.add(col_stride);
                for r0 in (0..rows).step_by(BLOCK_ROWS) {
                    let out = Out {
                        y: y.as_mut_ptr().add(r0 * n + c0),
                        stride: n * 4,
                        load,
                    };
                    let w = (w0, w1, input_stride);
                    block(x.as_ptr().add(r0 * k + t0 * K_STEP), k * 2, w, steps, out);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Where a block's sums go: 32 rows of `stride` bytes from `y`, read first when `load`.
struct Out {
    y: *mut f32,
    stride: usize,
    load: bool,
}

/// One 32 x 32 output block: tiles 0-3 accumulate (rows 0-15 | 16-31) x (cols 0-15 | 16-31),
/// starting from zero or from the block's values in `out` (`out.load`); tiles 4-5 hold the two
/// row halves of the activations, 6-7 the two column tiles of the weight.
///
/// # Safety
/// Tiles configured by [`CONFIG`]; `x` readable for 32 rows of `x_stride` bytes covering
/// `k_tiles * 64` bytes each, `w.0` / `w.1` for `k_tiles` tiles `w.2` elements apart, `out.y`
/// readable and writable for 32 rows of `out.stride` bytes covering 128 bytes each.
#[inline(always)]
unsafe fn block(
    x: *const u16,
    x_stride: usize,
    (w0, w1, w_step): (*const u16, *const u16, usize),
    k_tiles: usize,
    out: Out,
) {
    let (y, ys) = (out.y, out.stride);
    let y_low = y.add(16 * ys / 4);
    if out.load {
        asm!(
            "tileloadd tmm0, [{y} + {ys} * 1]",
            "tileloadd tmm1, [{y16} + {ys} * 1]",
            "tileloadd tmm2, [{yl} + {ys} * 1]",
            "tileloadd tmm3, [{yl16} + {ys} * 1]",
            y = in(reg) y,
            y16 = in(reg) y.add(16),
            yl = in(reg) y_low,
            yl16 = in(reg) y_low.add(16),
            ys = in(reg) ys,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    let x_low = x.add(16 * x_stride / 2);
    for t in 0..k_tiles {
        asm!(
            "tileloadd tmm4, [{x} + {xs} * 1]",
            "tileloadd tmm6, [{w0} + {ws} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{w1} + {ws} * 1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{xl} + {xs} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            x = in(reg) x.add(t * K_STEP),
            xl = in(reg) x_low.add(t * K_STEP),
            xs = in(reg) x_stride,
            w0 = in(reg) w0.add(t * w_step),
            w1 = in(reg) w1.add(t * w_step),
            ws = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{y} + {ys} * 1], tmm0",
        "tilestored [{y16} + {ys} * 1], tmm1",
        "tilestored [{yl} + {ys} * 1], tmm2",
        "tilestored [{yl16} + {ys} * 1], tmm3",
        y = in(reg) y,
        y16 = in(reg) y.add(16),
        yl = in(reg) y_low,
        yl16 = in(reg) y_low.add(16),
        ys = in(reg) ys,
        options(nostack),
    );
}
