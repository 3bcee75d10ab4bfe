//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared tiny LaVIT fixture (`../shared/fixtures/tiny-lavit` beside the repository).
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-lavit")
}

/// `../shared/fixtures` beside the repository.
pub fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// `n` synthetic photos (PNG): a coloured disc and a bar on a tinted background, each at its
/// own place and size.
pub fn write_images(dir: &std::path::Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let side = 64u32;
        let (cx, cy) = (16 + (i as u32 * 7) % 32, 16 + (i as u32 * 13) % 32);
        let r = 8 + (i as u32 * 5) % 12;
        let img = image::RgbImage::from_fn(side, side, |x, y| {
            let dx = x as i64 - cx as i64;
            let dy = y as i64 - cy as i64;
            if dx * dx + dy * dy < (r * r) as i64 {
                image::Rgb([(40 * i % 256) as u8, 200, (90 + 30 * i % 160) as u8])
            } else if (y + i as u32 * 3) % 32 < 5 {
                image::Rgb([20, 20, (60 * i % 256) as u8])
            } else {
                image::Rgb([
                    (120 + 9 * i % 100) as u8,
                    (x * 3) as u8,
                    (y * 2 + i as u32) as u8,
                ])
            }
        });
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
    }
}
