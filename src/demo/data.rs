//! Fashion-MNIST for the demo: the gzipped IDX files (Xiao, Rasul & Vollgraf 2017, MIT licence;
//! Debian package `dataset-fashion-mnist`), class names, caption templates, a deterministic
//! train / held-out split, and the conversion to the tokenizer's input tensors.
//!
//! IDX format (LeCun's MNIST page): big-endian u32 magic (0x00000803 = 2051 for u8 images of rank
//! 3, 0x00000801 = 2049 for u8 labels of rank 1), then one big-endian u32 per dimension, then the
//! raw bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// Where Debian's `dataset-fashion-mnist` installs the files.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Side of a Fashion-MNIST image in pixels.
pub const SIDE: usize = 28;

/// The ten classes, in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Caption templates; `{}` is the class name with its article.
pub const TEMPLATES: [&str; 4] = [
    "a photo of {}",
    "a black and white picture of {}",
    "an image of {}",
    "a small photo of {}",
];

/// How users name each class besides [`CLASS_NAMES`]: the plural, then Fashion-MNIST's own
/// label name (its `classes` list: "T-shirt/top", "Trouser", … "Ankle boot").
pub const CLASS_FORMS: [[&str; 2]; 10] = [
    ["t-shirts", "t-shirt/top"],
    ["trousers", "trouser"],
    ["pullovers", "pullover"],
    ["dresses", "dress"],
    ["coats", "coat"],
    ["sandals", "sandal"],
    ["shirts", "shirt"],
    ["sneakers", "sneaker"],
    ["bags", "bag"],
    ["ankle boots", "ankle boot"],
];

/// Text → image prompt templates stage 2 trains on (`{}` is the class as the phrasing names
/// it); [`HELD_OUT_TEMPLATES`] are never trained on and measure how far the text side
/// generalises.
pub const PROMPT_TEMPLATES: [&str; 8] = [
    "a photo of {}",
    "a black and white picture of {}",
    "an image of {}",
    "a small photo of {}",
    "{}",
    "a picture of {}",
    "photo of {}",
    "a black and white photo of {}",
];

/// Prompt templates the evaluation uses and training never sees (their words are the
/// training templates' words, in new combinations).
pub const HELD_OUT_TEMPLATES: [&str; 4] = [
    "a small picture of {}",
    "a black and white image of {}",
    "picture of {}",
    "a small image of {}",
];

/// A prompt as users write it, drawn by `variant` (any number: the draw is a hash of it):
/// `template` is filled with the class in one of its forms — singular with its article (one
/// time in six the wrong one: "a ankle boot"), plural, the data set's label name (with or
/// without an article) — in lower case, Capitalised, Title Case or UPPER CASE.
pub fn phrasing(label: usize, template: &str, variant: u64) -> String {
    // consecutive variants draw independent choices
    let z = lavit_runtime::train::splitmix64(variant);
    // the singular five times in twelve, the plural three, each other form once
    let form = match z % 12 {
        0..=4 => 0,
        5 => 1,
        6..=8 => 2,
        f => f - 6,
    };
    let case = match (z >> 8) % 8 {
        0..=3 => 0,
        4 | 5 => 1,
        6 => 2,
        _ => 3,
    };
    phrase(label, template, form, case, (z >> 16).is_multiple_of(4))
}

/// Number of class forms and letter cases [`phrase`] knows.
pub const PHRASE_FORMS: u64 = 6;
pub const PHRASE_CASES: u64 = 4;

/// `template` filled with class `label` in `form` (0: singular with its article, 1: the
/// wrong article, 2: plural, 3: the label name, 4: the label name with its article, 5:
/// "the" singular) and letter `case` (0: as is, 1: Capitalised, 2: Title Case, 3: UPPER),
/// the sentence's first letter capitalised when `capital`.
pub fn phrase(label: usize, template: &str, form: u64, case: u64, capital: bool) -> String {
    let name = CLASS_NAMES[label % CLASS_NAMES.len()];
    let [plural, label_name] = CLASS_FORMS[label % CLASS_FORMS.len()];
    let thing = match form {
        0 => with_article(name),
        1 => {
            let right = with_article(name);
            if right.starts_with("an ") {
                format!("a {name}")
            } else {
                format!("an {name}")
            }
        }
        2 => plural.to_string(),
        3 => label_name.to_string(),
        4 => with_article(label_name),
        _ => format!("the {name}"),
    };
    let thing = match case {
        0 => thing,
        1 => capitalise(&thing),
        2 => thing
            .split(' ')
            .map(capitalise)
            .collect::<Vec<_>>()
            .join(" "),
        _ => thing.to_uppercase(),
    };
    let text = template.replace("{}", &thing);
    if capital {
        capitalise(&text)
    } else {
        text
    }
}

/// A training prompt for class `label`: [`phrasing`] over [`PROMPT_TEMPLATES`].
pub fn training_prompt(label: usize, variant: u64) -> String {
    let t = PROMPT_TEMPLATES[(variant % PROMPT_TEMPLATES.len() as u64) as usize];
    phrasing(label, t, variant / PROMPT_TEMPLATES.len() as u64)
}

/// A held-out prompt for class `label`: [`phrasing`] over [`HELD_OUT_TEMPLATES`].
pub fn held_out_prompt(label: usize, variant: u64) -> String {
    let t = HELD_OUT_TEMPLATES[(variant % HELD_OUT_TEMPLATES.len() as u64) as usize];
    // an offset keeps the held-out draws apart from the training draws of the same number
    phrasing(
        label,
        t,
        (variant / HELD_OUT_TEMPLATES.len() as u64) ^ 0x005e_ed0f_4e1d,
    )
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Errors reading the data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "{path}: {source} (install the data with `scripts/setup.sh --data`, or pass --data DIR)"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

/// "a sneaker", "an ankle boot".
pub fn with_article(name: &str) -> String {
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

/// Caption `template` (index into [`TEMPLATES`], wrapped) for class `label`.
pub fn caption(label: usize, template: usize) -> String {
    TEMPLATES[template % TEMPLATES.len()].replace("{}", &with_article(CLASS_NAMES[label]))
}

/// The class a caption names, if exactly one class name (singular or plural, any case)
/// occurs in it ("shirt" inside "t-shirt" does not count).
pub fn class_of_caption(text: &str) -> Option<usize> {
    let text = text.to_lowercase();
    let mut found = None;
    for (c, name) in CLASS_NAMES.iter().enumerate() {
        let [plural, _] = CLASS_FORMS[c];
        let hit = [plural, name].iter().any(|name| {
            text.match_indices(name).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + name.len()..].chars().next();
                !matches!(before, Some(ch) if ch.is_alphanumeric() || ch == '-')
                    && !matches!(after, Some(ch) if ch.is_alphanumeric() || ch == '-')
            })
        });
        if hit {
            if found.is_some() {
                return None;
            }
            found = Some(c);
        }
    }
    found
}

/// Images and labels of one IDX pair.
#[derive(Debug, Clone)]
pub struct Split {
    /// Row-major u8 pixels, `SIDE * SIDE` per image.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Split {
        let mut pixels = Vec::with_capacity(idx.len() * SIDE * SIDE);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Split { pixels, labels }
    }

    /// Images `idx` as float [B, 1, 28, 28] in [0, 1].
    pub fn batch_unit(&self, idx: &[usize]) -> Tensor {
        let mut buf = Vec::with_capacity(idx.len() * SIDE * SIDE);
        for &i in idx {
            buf.extend_from_slice(self.image(i));
        }
        Tensor::from_slice(&buf)
            .view([idx.len() as i64, 1, SIDE as i64, SIDE as i64])
            .to_kind(Kind::Float)
            / 255.0
    }

    /// Labels `idx` as int64 [B].
    pub fn batch_labels(&self, idx: &[usize]) -> Tensor {
        let l: Vec<i64> = idx.iter().map(|&i| self.labels[i] as i64).collect();
        Tensor::from_slice(&l)
    }

    /// Per-class count.
    pub fn class_counts(&self) -> [usize; 10] {
        let mut c = [0; 10];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }
}

/// The whole data set: the official 60k training and 10k test files.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    pub train: Split,
    pub test: Split,
}

impl FashionMnist {
    /// Reads `train-{images-idx3,labels-idx1}-ubyte.gz` and `t10k-…` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let read = |images: &str, labels: &str| -> Result<Split, DataError> {
            let (n, pixels) = read_idx_images(&dir.join(images))?;
            let labels_v = read_idx_labels(&dir.join(labels))?;
            if labels_v.len() != n {
                return Err(DataError::Format {
                    path: dir.join(labels),
                    msg: format!("{} labels for {n} images in {images}", labels_v.len()),
                });
            }
            Ok(Split {
                pixels,
                labels: labels_v,
            })
        };
        Ok(Self {
            train: read("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")?,
            test: read("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")?,
        })
    }
}

/// Reads a whole file through the capped regular-file reader (never a FIFO or a device),
/// gunzipping it when it starts with the gzip magic; file and inflated data are each at
/// most [`fsread::MAX_DATA_FILE_BYTES`] (a gzip bomb is refused after that many bytes).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    use lavit_runtime::fsread;
    let cap = fsread::MAX_DATA_FILE_BYTES;
    let format = |msg: String| DataError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let raw = match fsread::read_capped(path, cap) {
        Ok(raw) => raw,
        Err(lavit_runtime::Error::Io { source, .. }) => {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(lavit_runtime::Error::Checkpoint { msg, .. }) => return Err(format(msg)),
        Err(e) => return Err(format(e.to_string())),
    };
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| format(format!("bad gzip stream: {e}")))?;
        if out.len() as u64 > cap {
            return Err(format(format!(
                "inflates to more than the {cap}-byte cap for a data file"
            )));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize, path: &Path) -> Result<u32, DataError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| DataError::Format {
            path: path.to_path_buf(),
            msg: format!("truncated header ({} bytes)", bytes.len()),
        })
}

/// Parses IDX u8 images (magic 2051) of 28×28 → (count, pixels).
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<(usize, Vec<u8>), DataError> {
    let fmt = |msg: String| DataError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let magic = be_u32(bytes, 0, path)?;
    if magic != 2051 {
        return Err(fmt(format!(
            "magic number {magic}, expected 2051 (IDX u8 images of rank 3)"
        )));
    }
    let n = be_u32(bytes, 4, path)? as usize;
    let rows = be_u32(bytes, 8, path)? as usize;
    let cols = be_u32(bytes, 12, path)? as usize;
    if rows != SIDE || cols != SIDE {
        return Err(fmt(format!("images are {rows}×{cols}, expected 28×28")));
    }
    let want = n
        .checked_mul(SIDE * SIDE)
        .ok_or_else(|| fmt(format!("image count {n} overflows")))?;
    let body = &bytes[16..];
    if body.len() != want {
        return Err(fmt(format!(
            "{} pixel bytes for {n} images of 28×28 (expected {want})",
            body.len()
        )));
    }
    Ok((n, body.to_vec()))
}

/// Parses IDX u8 labels (magic 2049), each in 0..10.
pub fn parse_idx_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    let fmt = |msg: String| DataError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let magic = be_u32(bytes, 0, path)?;
    if magic != 2049 {
        return Err(fmt(format!(
            "magic number {magic}, expected 2049 (IDX u8 labels of rank 1)"
        )));
    }
    let n = be_u32(bytes, 4, path)? as usize;
    let body = &bytes[8..];
    if body.len() != n {
        return Err(fmt(format!("{} label bytes for {n} labels", body.len())));
    }
    if let Some(i) = body.iter().position(|&l| l >= 10) {
        return Err(fmt(format!(
            "label {} at index {i} is not in 0..10",
            body[i]
        )));
    }
    Ok(body.to_vec())
}

pub fn read_idx_images(path: &Path) -> Result<(usize, Vec<u8>), DataError> {
    parse_idx_images(&read_maybe_gz(path)?, path)
}

pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    parse_idx_labels(&read_maybe_gz(path)?, path)
}

/// A deterministic, class-balanced subset: the first `per_class` images of each class in a
/// seeded permutation of `split`, returned as indices in that permuted order.
pub fn balanced_subset(split: &Split, per_class: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..split.len()).collect();
    shuffle(&mut order, seed);
    let mut taken = [0usize; 10];
    order
        .into_iter()
        .filter(|&i| {
            let c = split.labels[i] as usize;
            taken[c] += 1;
            taken[c] <= per_class
        })
        .collect()
}

/// Fisher–Yates with a SplitMix64 stream (no dependency, same result everywhere).
pub fn shuffle(v: &mut [usize], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): a tiny deterministic generator for data order.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// CLIP mean / std (LaVITImageProcessor), per RGB channel.
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// [B, 1, 28, 28] in [0, 1] → [B, 3, size, size] CLIP-normalised RGB, the tokenizer's input.
/// The image is zero-padded (Fashion-MNIST's background is black) to `size` when `size` ≥ 28
/// and 28 + padding is within 4 px, otherwise resized bilinearly.
pub fn to_model_input(unit: &Tensor, size: i64) -> Tensor {
    let x = to_pixel_space(unit, size); // (B, 1, S, S) in [0, 1]
    let rgb = x.repeat([1, 3, 1, 1]); // (B, 3, S, S)
    let mean = Tensor::from_slice(&CLIP_MEAN)
        .to_kind(Kind::Float)
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&CLIP_STD)
        .to_kind(Kind::Float)
        .view([1, 3, 1, 1]);
    (rgb - mean) / std
}

/// [B, 1, 28, 28] in [0, 1] → [B, 1, size, size] in [0, 1] (padding or bilinear resize, as
/// [`to_model_input`]).
pub fn to_pixel_space(unit: &Tensor, size: i64) -> Tensor {
    let side = SIDE as i64;
    if size == side {
        unit.shallow_clone()
    } else if size > side && size - side <= 4 {
        let lo = (size - side) / 2;
        let hi = size - side - lo;
        unit.constant_pad_nd([lo, hi, lo, hi])
    } else {
        unit.upsample_bilinear2d([size, size], false, None, None)
    }
}

/// Inverse of [`to_pixel_space`]: [B, C, size, size] → [B, C, 28, 28].
pub fn from_pixel_space(x: &Tensor, size: i64) -> Tensor {
    let side = SIDE as i64;
    if size == side {
        x.shallow_clone()
    } else if size > side && size - side <= 4 {
        let lo = (size - side) / 2;
        x.narrow(2, lo, side).narrow(3, lo, side)
    } else {
        x.upsample_bilinear2d([side, side], false, None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_name_their_class() {
        for c in 0..10 {
            for t in 0..TEMPLATES.len() {
                assert_eq!(
                    class_of_caption(&caption(c, t)),
                    Some(c),
                    "{}",
                    caption(c, t)
                );
            }
        }
        assert_eq!(caption(9, 1), "a black and white picture of an ankle boot");
        assert_eq!(class_of_caption("a shirt or a dress"), None);
        assert_eq!(class_of_caption("a thing"), None);
    }

    #[test]
    fn prompts_vary_as_users_write_them_and_name_their_class() {
        let mut seen = std::collections::BTreeSet::new();
        for c in 0..10 {
            for v in 0..400u64 {
                for p in [training_prompt(c, v), held_out_prompt(c, v)] {
                    // every phrasing names its class, plural or not, in any case
                    assert_eq!(class_of_caption(&p), Some(c), "{p}");
                    seen.insert(p);
                }
            }
        }
        // plurals, the label names, capitals, upper case and wrong articles all occur
        for p in [
            "sneakers",
            "T-shirt/top",
            "Ankle Boots",
            "A SANDAL",
            "a ankle boot",
            "an sandal",
        ] {
            assert!(
                seen.iter()
                    .any(|s| s.to_lowercase().contains(&p.to_lowercase())
                        && (p.chars().all(|ch| !ch.is_uppercase()) || s.contains(p))),
                "{p} never drawn"
            );
        }
        // the held-out templates are no training template
        for t in HELD_OUT_TEMPLATES {
            assert!(!PROMPT_TEMPLATES.contains(&t), "{t}");
        }
        assert_eq!(
            phrase(9, "a photo of {}", 1, 0, false),
            "a photo of a ankle boot"
        );
        assert_eq!(phrase(0, "{}", 3, 2, false), "T-shirt/top");
        assert_eq!(
            phrase(3, "an image of {}", 2, 3, true),
            "An image of DRESSES"
        );
    }

    #[test]
    fn idx_rejects_bad_magic_and_sizes() {
        let p = Path::new("x");
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
        img.extend(vec![7u8; 784]);
        assert_eq!(parse_idx_images(&img, p).unwrap().0, 1);
        let mut bad = img.clone();
        bad[3] = 1;
        assert!(parse_idx_images(&bad, p)
            .unwrap_err()
            .to_string()
            .contains("2051"));
        assert!(parse_idx_images(&img[..700], p).is_err());
        assert!(parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 2, 3, 4], p).is_ok());
        assert!(parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 2, 3, 11], p).is_err());
        assert!(parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 3, 3, 4], p).is_err());
    }
}
