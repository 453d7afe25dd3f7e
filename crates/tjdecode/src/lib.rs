//! Minimal safe wrapper over the system libjpeg-turbo's TurboJPEG 2.x API
//! (`libturbojpeg.so.0`; Debian package `libturbojpeg0`, `libturbojpeg0-dev`
//! to build). Only what a scaled RGB/gray/CMYK decode needs, plus an encoder
//! (4:2:0 like a camera's, or progressive) for tests and benchmarks. The
//! TurboJPEG 2.x functions used here are also exported, unchanged, by
//! TurboJPEG 3.x.
//!
//! The library is optional at build time: `build.rs` looks for it and links
//! it when found. Without it the crate still builds, [`AVAILABLE`] is false
//! and every call returns [`Error::Unavailable`], so a caller can fall back
//! to another decoder instead of failing to build.
//!
//! Why not the `turbojpeg` crate: 1.x binds the TurboJPEG 3 API (Debian 12
//! ships 2.1.5, so it would build libjpeg-turbo from source with cmake and
//! nasm), and 0.5.x always passes `flags = 0`, so libjpeg warnings such as
//! "premature end of data segment" cannot be made errors.
//!
//! All unsafe code of the sidecar's decode path lives here, so the crate
//! that uses it keeps `#![forbid(unsafe_code)]`.
//!
//! Decompressor handles are expensive-ish to create (libjpeg's decompress
//! struct and memory pools), not thread-safe, and reusable, so each thread
//! keeps one in a thread-local.

use std::fmt;

/// Whether libjpeg-turbo was found and linked at build time.
pub const AVAILABLE: bool = cfg!(tjdecode_linked);

/// Where the build found the library (`None` when it was not found).
pub fn found_at() -> Option<&'static str> {
    option_env!("TJDECODE_FOUND")
}

/// Output pixel layouts this wrapper supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// `TJPF_RGB`: 3 bytes per pixel, R, G, B.
    Rgb,
    /// `TJPF_GRAY`: 1 byte per pixel.
    Gray,
    /// `TJPF_CMYK`: 4 bytes per pixel, as stored in the file (Adobe
    /// applications store inverted CMYK: 255 = no ink).
    Cmyk,
}

impl PixelFormat {
    /// Bytes per pixel.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb => 3,
            PixelFormat::Gray => 1,
            PixelFormat::Cmyk => 4,
        }
    }
}

/// Chroma subsampling of an encoded JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    /// 4:4:4, no chroma subsampling.
    S444,
    /// 4:2:2, chroma halved horizontally.
    S422,
    /// 4:2:0, chroma halved both ways: what cameras and libjpeg emit by default.
    S420,
    /// Grayscale (luma only).
    Gray,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The crate was built without libjpeg-turbo.
    Unavailable,
    /// The arguments are inconsistent (buffer sizes, sizes out of range).
    Arguments(String),
    /// libjpeg-turbo refused the data: its own message. Warnings (truncated
    /// or corrupt entropy-coded data, ...) are errors here too.
    Jpeg(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable => f.write_str("built without libjpeg-turbo"),
            Error::Arguments(m) | Error::Jpeg(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Decompresses `jpeg` into `out` (rows packed, no padding), which must hold
/// exactly `width * height * format.bytes_per_pixel()` bytes.
///
/// Scaling: `width`×`height` should be the image size scaled by one of
/// libjpeg-turbo's factors and rounded up, `ceil(W * n / 8)` (n = 1, 2, 4 for
/// 1/8, 1/4, 1/2 — the cheap ones — or 8 for full size). TurboJPEG picks the
/// *largest* factor whose output fits within the requested size, so an exact
/// scaled size selects exactly that factor; any other request gives an
/// image smaller than requested, with rows still `width` apart.
///
/// Every libjpeg warning (truncated or corrupt entropy-coded data, extraneous
/// bytes, ...) is an error, and progressive files with an excessive number of
/// scans are refused.
pub fn decompress(
    jpeg: &[u8],
    width: u32,
    height: u32,
    format: PixelFormat,
    out: &mut [u8],
) -> Result<(), Error> {
    let need = width as usize * height as usize * format.bytes_per_pixel();
    if out.len() != need {
        return Err(Error::Arguments(format!(
            "output buffer is {} bytes, {need} needed",
            out.len()
        )));
    }
    ffi::decompress(jpeg, width, height, format, out)
}

/// Compresses `pixels` (`width`×`height`, RGB or gray per `format`, rows
/// packed) at `quality` (1–100) with `subsampling`, baseline or progressive.
/// For tests and benchmarks: frames like the ones cameras send.
pub fn compress(
    pixels: &[u8],
    width: u32,
    height: u32,
    format: PixelFormat,
    quality: u8,
    subsampling: Subsampling,
    progressive: bool,
) -> Result<Vec<u8>, Error> {
    if format == PixelFormat::Cmyk {
        return Err(Error::Arguments("CMYK encoding is not supported".into()));
    }
    let need = width as usize * height as usize * format.bytes_per_pixel();
    if pixels.len() != need || width == 0 || height == 0 {
        return Err(Error::Arguments(format!(
            "input buffer is {} bytes, {need} needed for {width}x{height}",
            pixels.len()
        )));
    }
    ffi::compress(
        pixels,
        width,
        height,
        format,
        quality.clamp(1, 100),
        subsampling,
        progressive,
    )
}

#[cfg(tjdecode_linked)]
mod ffi {
    use std::cell::RefCell;
    use std::ffi::CStr;
    use std::os::raw::{c_char, c_int, c_uchar, c_ulong, c_void};
    use std::ptr::NonNull;

    use super::{Error, PixelFormat, Subsampling};

    /// Turn every libjpeg warning (e.g. "premature end of data segment",
    /// "corrupt JPEG data: N extraneous bytes") into an error: libjpeg would
    /// otherwise pad truncated data with zeros and return success.
    const TJFLAG_STOPONWARNING: c_int = 8192;
    /// Refuse progressive files with an unreasonable number of scans (CPU DoS).
    const TJFLAG_LIMITSCANS: c_int = 32768;
    /// The output buffer is preallocated (`tjBufSize`); never reallocate it.
    const TJFLAG_NOREALLOC: c_int = 1024;
    /// Write a progressive JPEG.
    const TJFLAG_PROGRESSIVE: c_int = 16384;
    /// `TJERR_WARNING`: the error code of a stopped-on warning.
    const TJERR_WARNING: c_int = 0;

    unsafe extern "C" {
        fn tjInitDecompress() -> *mut c_void;
        fn tjInitCompress() -> *mut c_void;
        fn tjDecompress2(
            handle: *mut c_void,
            jpeg_buf: *const c_uchar,
            jpeg_size: c_ulong,
            dst_buf: *mut c_uchar,
            width: c_int,
            pitch: c_int,
            height: c_int,
            pixel_format: c_int,
            flags: c_int,
        ) -> c_int;
        fn tjCompress2(
            handle: *mut c_void,
            src_buf: *const c_uchar,
            width: c_int,
            pitch: c_int,
            height: c_int,
            pixel_format: c_int,
            jpeg_buf: *mut *mut c_uchar,
            jpeg_size: *mut c_ulong,
            subsampling: c_int,
            quality: c_int,
            flags: c_int,
        ) -> c_int;
        fn tjBufSize(width: c_int, height: c_int, subsampling: c_int) -> c_ulong;
        fn tjDestroy(handle: *mut c_void) -> c_int;
        fn tjGetErrorStr2(handle: *mut c_void) -> *const c_char;
        fn tjGetErrorCode(handle: *mut c_void) -> c_int;
    }

    fn tjpf(format: PixelFormat) -> c_int {
        match format {
            PixelFormat::Rgb => 0,
            PixelFormat::Gray => 6,
            PixelFormat::Cmyk => 11,
        }
    }

    fn tjsamp(subsampling: Subsampling) -> c_int {
        match subsampling {
            Subsampling::S444 => 0,
            Subsampling::S422 => 1,
            Subsampling::S420 => 2,
            Subsampling::Gray => 3,
        }
    }

    /// An owned TurboJPEG handle (compressor or decompressor).
    struct Handle(NonNull<c_void>);

    impl Handle {
        fn new(compress: bool) -> Result<Self, Error> {
            // SAFETY: no preconditions; both return NULL on failure.
            let ptr = unsafe {
                if compress {
                    tjInitCompress()
                } else {
                    tjInitDecompress()
                }
            };
            NonNull::new(ptr)
                .map(Handle)
                .ok_or_else(|| Error::Jpeg("tjInit failed".into()))
        }

        fn error(&self) -> Error {
            // SAFETY: the handle is valid; tjGetErrorStr2 returns a NUL-terminated
            // string owned by the handle (or a static one), valid until the next call.
            let (text, code) = unsafe {
                let ptr = tjGetErrorStr2(self.0.as_ptr());
                let text = if ptr.is_null() {
                    "unknown libjpeg-turbo error".to_string()
                } else {
                    CStr::from_ptr(ptr).to_string_lossy().into_owned()
                };
                (text, tjGetErrorCode(self.0.as_ptr()))
            };
            Error::Jpeg(if code == TJERR_WARNING {
                format!("{text} (libjpeg-turbo warning, treated as an error)")
            } else {
                text
            })
        }
    }

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: the handle came from tjInit* and is destroyed once.
            unsafe { tjDestroy(self.0.as_ptr()) };
        }
    }

    thread_local! {
        static DECOMPRESSOR: RefCell<Option<Handle>> = const { RefCell::new(None) };
    }

    fn int(v: u32) -> Result<c_int, Error> {
        c_int::try_from(v).map_err(|_| Error::Arguments(format!("size {v} out of range")))
    }

    pub(super) fn decompress(
        jpeg: &[u8],
        width: u32,
        height: u32,
        format: PixelFormat,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let (w, h) = (int(width)?, int(height)?);
        let size = c_ulong::try_from(jpeg.len())
            .map_err(|_| Error::Arguments("input too large".into()))?;
        DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Handle::new(false)?);
            }
            let Some(d) = slot.as_ref() else {
                return Err(Error::Jpeg("no decompressor".into()));
            };
            // SAFETY: the handle is valid and used by this thread only; `jpeg` is
            // valid for `size` bytes; `out` holds `width * bpp * height` bytes
            // (checked by the caller; pitch 0 = width * bpp), and the library
            // writes at most the requested size (it scales to fit within it).
            let rc = unsafe {
                tjDecompress2(
                    d.0.as_ptr(),
                    jpeg.as_ptr(),
                    size,
                    out.as_mut_ptr(),
                    w,
                    0,
                    h,
                    tjpf(format),
                    TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(d.error())
            }
        })
    }

    pub(super) fn compress(
        pixels: &[u8],
        width: u32,
        height: u32,
        format: PixelFormat,
        quality: u8,
        subsampling: Subsampling,
        progressive: bool,
    ) -> Result<Vec<u8>, Error> {
        let (w, h) = (int(width)?, int(height)?);
        let samp = if format == PixelFormat::Gray {
            tjsamp(Subsampling::Gray)
        } else {
            tjsamp(subsampling)
        };
        let handle = Handle::new(true)?;
        // SAFETY: pure function of its arguments.
        let bound = unsafe { tjBufSize(w, h, samp) };
        if bound == c_ulong::MAX || bound == 0 {
            return Err(Error::Arguments("tjBufSize failed".into()));
        }
        let mut out = vec![
            0u8;
            usize::try_from(bound)
                .map_err(|_| Error::Arguments("output too large".into()))?
        ];
        let mut ptr = out.as_mut_ptr();
        let mut len = bound;
        let mut flags = TJFLAG_NOREALLOC;
        if progressive {
            flags |= TJFLAG_PROGRESSIVE;
        }
        // SAFETY: the handle is valid; `pixels` holds width * bpp * height
        // bytes (checked by the caller; pitch 0 = packed rows); `out` holds
        // tjBufSize bytes, the most the library writes, and NOREALLOC keeps
        // it from reallocating (or freeing) our buffer.
        let rc = unsafe {
            tjCompress2(
                handle.0.as_ptr(),
                pixels.as_ptr(),
                w,
                0,
                h,
                tjpf(format),
                &mut ptr,
                &mut len,
                samp,
                c_int::from(quality),
                flags,
            )
        };
        if rc != 0 {
            return Err(handle.error());
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > out.len() || ptr != out.as_mut_ptr() {
            return Err(Error::Jpeg("encoder wrote outside its buffer".into()));
        }
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(not(tjdecode_linked))]
mod ffi {
    use super::{Error, PixelFormat, Subsampling};

    pub(super) fn decompress(
        _jpeg: &[u8],
        _width: u32,
        _height: u32,
        _format: PixelFormat,
        _out: &mut [u8],
    ) -> Result<(), Error> {
        Err(Error::Unavailable)
    }

    pub(super) fn compress(
        _pixels: &[u8],
        _width: u32,
        _height: u32,
        _format: PixelFormat,
        _quality: u8,
        _subsampling: Subsampling,
        _progressive: bool,
    ) -> Result<Vec<u8>, Error> {
        Err(Error::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
            .collect()
    }

    #[test]
    fn round_trip_at_every_scale_or_unavailable() {
        let (w, h) = (64, 48);
        let jpeg = match compress(
            &gradient(w, h),
            w,
            h,
            PixelFormat::Rgb,
            90,
            Subsampling::S420,
            false,
        ) {
            Ok(j) => j,
            Err(Error::Unavailable) => {
                assert!(found_at().is_none(), "unavailable only when not found");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(found_at().is_some(), "linked means found");
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        for denom in [1u32, 2, 4, 8] {
            let (sw, sh) = (w.div_ceil(denom), h.div_ceil(denom));
            let mut out = vec![0; (sw * sh * 3) as usize];
            decompress(&jpeg, sw, sh, PixelFormat::Rgb, &mut out).expect("decodes");
            // The top-left pixel of a left-to-right, top-to-bottom ramp stays dark.
            assert!(out[0] < 40 && out[1] < 40, "1/{denom}: {:?}", &out[..3]);
        }
    }

    #[test]
    fn truncated_data_is_an_error_not_gray_pixels() {
        let (w, h) = (64, 64);
        let Ok(jpeg) = compress(
            &gradient(w, h),
            w,
            h,
            PixelFormat::Rgb,
            90,
            Subsampling::S444,
            false,
        ) else {
            return;
        };
        let cut = [&jpeg[..jpeg.len() * 2 / 3], &[0xFF, 0xD9][..]].concat();
        let mut out = vec![0; (w * h * 3) as usize];
        let err = decompress(&cut, w, h, PixelFormat::Rgb, &mut out).unwrap_err();
        assert!(matches!(err, Error::Jpeg(_)), "{err}");
        assert!(
            matches!(
                decompress(&jpeg, w, h, PixelFormat::Rgb, &mut out[1..]),
                Err(Error::Arguments(_))
            ),
            "a wrong buffer size is refused before the library sees it"
        );
    }
}
