//! Boot images: the kernel, initramfs and command line a guest booted with
//! travel with it, so that a guest restored or migrated in can reboot into
//! its own kernel.
//!
//! Images are content-addressed: each host keeps a store (a directory of
//! files named by their SHA-256, `--image-store`), a boot puts its kernel
//! and initramfs there, and the manifest names them by hash and size
//! ([`BootRecord`]). A snapshot carries the images it names (a snapshot is
//! one file); a live migration carries only what the destination's store
//! lacks (the destination lists those in its plan), so a guest's second
//! move to a host pays nothing for them.
//!
//! A store file is written under a temporary name and renamed once its
//! size and hash match, so readers never see a partial image and several
//! ferry processes may share one store.

use std::{
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Images travel in sections (IMAGE) of at most this many bytes.
pub const CHUNK: usize = 4 << 20;

/// The largest image a destination takes from a stream or a snapshot.
pub const MAX_IMAGE: u64 = 1 << 30;

/// One image: its content hash and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// SHA-256 of the content, 64 lowercase hex digits (also its name in
    /// a store).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl ImageRef {
    /// The ref of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ImageRef {
            sha256: hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()),
            size: bytes.len() as u64,
        }
    }

    /// A ref read from a stream or a snapshot names a file in the store,
    /// so it must be a hash and nothing else.
    pub fn check(&self) -> Result<(), ImageError> {
        let hex =
            self.sha256.len() == 64 && self.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex {
            return Err(ImageError::Bad {
                image: self.short(),
                message: "not a SHA-256 in lowercase hex".into(),
            });
        }
        if self.size > MAX_IMAGE {
            return Err(ImageError::Bad {
                image: self.short(),
                message: format!("{} bytes, more than the {} a boot image may have", self.size, MAX_IMAGE),
            });
        }
        Ok(())
    }

    /// How messages name it: `sha256:` and the first 12 digits.
    pub fn short(&self) -> String {
        let end = self.sha256.char_indices().nth(12).map_or(self.sha256.len(), |(i, _)| i);
        format!("sha256:{}", &self.sha256[..end])
    }
}

/// What a guest booted with, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// The kernel file (a PVH ELF or a bzImage) as it was loaded.
    pub kernel: ImageRef,
    /// The initramfs, if any.
    pub initramfs: Option<ImageRef>,
    /// The kernel command line.
    pub cmdline: String,
}

impl BootRecord {
    /// Every image it names.
    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        std::iter::once(&self.kernel).chain(self.initramfs.as_ref())
    }

    /// Every ref well-formed.
    pub fn check(&self) -> Result<(), ImageError> {
        self.images().try_for_each(ImageRef::check)
    }
}

/// Why an image cannot be stored, found or read.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The store directory or one of its files.
    #[error("image store {path}: {source}")]
    Store {
        /// The directory or file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An image that is not what its ref says.
    #[error("boot image {image}: {message}")]
    Bad {
        /// Its short name.
        image: String,
        /// What is wrong.
        message: String,
    },
}

/// A directory of images named by their SHA-256.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// The store in `dir` (made when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageStore { dir: dir.into() }
    }

    /// Where a store lives unless `--image-store` says: the user's cache
    /// (`$XDG_CACHE_HOME/ferry/images`, else `~/.cache/ferry/images`),
    /// else `/var/tmp/ferry/images`.
    pub fn default_dir() -> PathBuf {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(cache) = var("XDG_CACHE_HOME") {
            return cache.join("ferry/images");
        }
        match var("HOME") {
            Some(home) => home.join(".cache/ferry/images"),
            None => PathBuf::from("/var/tmp/ferry/images"),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `image` (checked to be a hash first).
    pub fn path(&self, image: &ImageRef) -> Result<PathBuf, ImageError> {
        image.check()?;
        Ok(self.dir.join(&image.sha256))
    }

    /// Does the store hold `image`? (A file of that name and size: files
    /// only ever get there checked.)
    pub fn has(&self, image: &ImageRef) -> bool {
        self.path(image)
            .is_ok_and(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == image.size))
    }

    /// The images of `record` this store lacks.
    pub fn missing(&self, record: &BootRecord) -> Vec<ImageRef> {
        record.images().filter(|i| !self.has(i)).cloned().collect()
    }

    /// Put `bytes` in the store (nothing is written if it holds them).
    pub fn put(&self, bytes: &[u8]) -> Result<ImageRef, ImageError> {
        let image = ImageRef::of(bytes);
        if !self.has(&image) {
            let mut incoming = self.receive(&image)?;
            incoming.write(bytes)?;
            incoming.finish()?;
        }
        Ok(image)
    }

    /// Start receiving `image` in pieces.
    pub fn receive(&self, image: &ImageRef) -> Result<IncomingImage, ImageError> {
        let path = self.path(image)?;
        let store_err = |p: &Path| {
            let p = p.display().to_string();
            move |source| ImageError::Store { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(store_err(&self.dir))?;
        let tmp = self.dir.join(format!(".{}.{}.partial", image.sha256, std::process::id()));
        let file = File::create(&tmp).map_err(store_err(&tmp))?;
        Ok(IncomingImage {
            image: image.clone(),
            path,
            tmp,
            file: Some(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            got: 0,
        })
    }

    /// Send `image` in pieces of at most [`CHUNK`] bytes to `each`.
    pub fn read_chunks<E>(
        &self,
        image: &ImageRef,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), ReadChunksError<E>> {
        let path = self.path(image)?;
        let store_err = |source| ImageError::Store { path: path.display().to_string(), source };
        let mut file = File::open(&path).map_err(store_err)?;
        let mut buf = vec![0u8; CHUNK.min(image.size as usize)];
        let mut left = image.size;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            file.read_exact(&mut buf[..n]).map_err(store_err)?;
            each(&buf[..n]).map_err(ReadChunksError::Sink)?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// [`ImageStore::read_chunks`] failed reading the store, or in `each`.
#[derive(Debug)]
pub enum ReadChunksError<E> {
    /// Reading the store.
    Store(ImageError),
    /// What `each` said.
    Sink(E),
}

impl<E> From<ImageError> for ReadChunksError<E> {
    fn from(e: ImageError) -> Self {
        ReadChunksError::Store(e)
    }
}

/// An image arriving in pieces: written under a temporary name, renamed
/// into the store by [`IncomingImage::finish`] once size and hash match,
/// removed if dropped before.
pub struct IncomingImage {
    image: ImageRef,
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hash: ring::digest::Context,
    got: u64,
}

impl IncomingImage {
    /// The next piece.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), ImageError> {
        if self.got + piece.len() as u64 > self.image.size {
            return Err(self.bad(format!("more than its {} bytes arrived", self.image.size)));
        }
        let tmp = &self.tmp;
        let Some(file) = self.file.as_mut() else {
            return Err(ImageError::Bad { image: self.image.short(), message: "already finished".into() });
        };
        file.write_all(piece)
            .map_err(|source| ImageError::Store { path: tmp.display().to_string(), source })?;
        self.hash.update(piece);
        self.got += piece.len() as u64;
        Ok(())
    }

    /// Has every byte arrived?
    pub fn complete(&self) -> bool {
        self.got == self.image.size
    }

    /// Check size and hash and put the image in the store.
    pub fn finish(mut self) -> Result<(), ImageError> {
        if !self.complete() {
            return Err(self.bad(format!("{} of its {} bytes arrived", self.got, self.image.size)));
        }
        let got = hex(self.hash.clone().finish().as_ref());
        if got != self.image.sha256 {
            return Err(self.bad(format!("its content hashes to sha256:{got}")));
        }
        let tmp = self.tmp.display().to_string();
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(|source| ImageError::Store { path: tmp.clone(), source })?;
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|source| ImageError::Store { path: tmp, source })?;
        Ok(())
    }

    fn bad(&self, message: String) -> ImageError {
        ImageError::Bad { image: self.image.short(), message }
    }
}

impl Drop for IncomingImage {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Images arriving as IMAGE sections (a snapshot's, or those a live
/// migration's destination asked for): each piece goes to the image it
/// names, the pieces of one image in a row; an image nobody asked for, a
/// piece too many, or content that does not hash to its name is refused.
pub struct Arrivals {
    store: ImageStore,
    wanted: Vec<ImageRef>,
    current: Option<IncomingImage>,
    /// Bytes of image received.
    pub bytes: u64,
}

impl Arrivals {
    /// Expect `wanted` (each checked to be well-formed) into `store`.
    pub fn new(store: &ImageStore, wanted: Vec<ImageRef>) -> Result<Self, ImageError> {
        wanted.iter().try_for_each(ImageRef::check)?;
        Ok(Arrivals { store: store.clone(), wanted, current: None, bytes: 0 })
    }

    /// Does a section for image `sha256` need reading? (False for an
    /// image the store already holds, which a reader may skip.)
    pub fn needs(&self, sha256: &str) -> bool {
        self.current.as_ref().is_some_and(|c| c.image.sha256 == sha256)
            || self.wanted.iter().any(|w| w.sha256 == sha256 && !self.store.has(w))
    }

    /// The next piece of image `sha256`.
    pub fn take(&mut self, sha256: &str, piece: &[u8]) -> Result<(), ImageError> {
        if self.current.as_ref().is_some_and(|c| c.image.sha256 != sha256) {
            self.end_current()?;
        }
        let mut incoming = match self.current.take() {
            Some(incoming) => incoming,
            None => {
                let Some(at) = self.wanted.iter().position(|w| w.sha256 == sha256) else {
                    return Err(ImageError::Bad {
                        image: format!("sha256:{}", sha256.chars().take(12).collect::<String>()),
                        message: "arrived unasked (or twice)".into(),
                    });
                };
                let image = self.wanted.remove(at);
                self.store.receive(&image)?
            }
        };
        incoming.write(piece)?;
        self.bytes += piece.len() as u64;
        if incoming.complete() {
            incoming.finish()
        } else {
            self.current = Some(incoming);
            Ok(())
        }
    }

    /// No more pieces: an image cut short is refused.
    pub fn finish(mut self) -> Result<u64, ImageError> {
        self.end_current()?;
        Ok(self.bytes)
    }

    fn end_current(&mut self) -> Result<(), ImageError> {
        match self.current.take() {
            Some(incoming) => incoming.finish(),
            None => Ok(()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> ImageStore {
        let dir = std::env::temp_dir().join(format!("ferry-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ImageStore::new(dir)
    }

    #[test]
    fn an_image_put_is_found_by_its_hash_and_read_back_in_chunks() {
        let s = store("put");
        let bytes: Vec<u8> = (0..CHUNK + 100).map(|i| (i % 251) as u8).collect();
        let image = s.put(&bytes).unwrap();
        assert_eq!(image.size, bytes.len() as u64);
        assert_eq!(image, ImageRef::of(&bytes));
        assert!(s.has(&image));
        let mut back = Vec::new();
        let mut pieces = 0;
        s.read_chunks(&image, |p| {
            pieces += 1;
            back.extend_from_slice(p);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!((back == bytes, pieces), (true, 2));
        let record =
            BootRecord { kernel: image, initramfs: Some(ImageRef::of(b"other")), cmdline: String::new() };
        assert_eq!(s.missing(&record), vec![ImageRef::of(b"other")]);
        let _ = std::fs::remove_dir_all(s.dir());
    }

    #[test]
    fn a_wrong_hash_a_short_image_or_a_path_for_a_hash_never_lands_in_the_store() {
        let s = store("bad");
        let mut lie = ImageRef::of(b"what was promised");
        lie.size = 9;
        let mut incoming = s.receive(&lie).unwrap();
        incoming.write(b"delivered").unwrap();
        let e = incoming.finish().unwrap_err().to_string();
        assert!(e.contains("hashes to sha256:"), "{e}");
        assert!(!s.has(&lie));

        let short = ImageRef::of(b"twelve bytes");
        let mut incoming = s.receive(&short).unwrap();
        incoming.write(b"twelve").unwrap();
        assert!(incoming.finish().unwrap_err().to_string().contains("6 of its 12 bytes"));
        let mut incoming = s.receive(&short).unwrap();
        assert!(incoming.write(b"thirteen bytes").unwrap_err().to_string().contains("more than its 12"));
        drop(incoming);

        let escape = ImageRef { sha256: "../../etc/passwd".into(), size: 1 };
        assert!(s.path(&escape).unwrap_err().to_string().contains("not a SHA-256"));
        assert!(s.receive(&escape).is_err());
        let huge = ImageRef { sha256: "a".repeat(64), size: MAX_IMAGE + 1 };
        assert!(huge.check().unwrap_err().to_string().contains("more than"));
        let mut arrivals = Arrivals::new(&s, vec![short.clone()]).unwrap();
        assert!(arrivals.needs(&short.sha256) && !arrivals.needs(&"b".repeat(64)));
        assert!(arrivals.take(&"b".repeat(64), b"x").unwrap_err().to_string().contains("unasked"));
        arrivals.take(&short.sha256, b"twelve").unwrap();
        assert!(arrivals.finish().unwrap_err().to_string().contains("6 of its 12 bytes"), "cut short");
        let mut arrivals = Arrivals::new(&s, vec![short.clone()]).unwrap();
        arrivals.take(&short.sha256, b"twelve").unwrap();
        arrivals.take(&short.sha256, b" bytes").unwrap();
        assert_eq!(arrivals.finish().unwrap(), 12);
        assert!(s.has(&short));
        std::fs::remove_file(s.path(&short).unwrap()).unwrap();
        let left: Vec<_> = std::fs::read_dir(s.dir()).unwrap().collect();
        assert!(left.is_empty(), "no partial file stays: {left:?}");
        let _ = std::fs::remove_dir_all(s.dir());
    }
}
