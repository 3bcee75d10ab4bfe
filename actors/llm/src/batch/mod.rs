//! Continuous batching of the LLM: iteration-level scheduling (Orca, OSDI 2022; the batching
//! loops of TGI's router and vLLM's scheduler). The [`Engine`] holds a running set of
//! sequences and advances every one by one token per [`Engine::step`]:
//!
//! - a request is a [`Group`] of sequences: the n samples of an image-token request and,
//!   with guidance, their n unconditional twins (eq. 7's pair, as two sequences); the
//!   prompts of a caption request (× its beams);
//! - requests join between steps ([`Engine::plan`], first come first served, while the
//!   running set has room for their sequences and the KV pool for their blocks) and leave
//!   the step they finish, freeing their blocks; a cancelled one leaves at once
//!   ([`Engine::remove`]);
//! - a step is at most two forwards: the prompts being prefilled (in chunks of at most
//!   `max_prefill_tokens` positions per step, so a long prompt never stalls the decodes) and
//!   one decoding position of every other running sequence;
//! - keys and values live in a [`KvPool`] of fixed-size blocks, allocated once; a request
//!   reserves the blocks of its prompt and its longest answer when it is admitted, so a
//!   running batch never runs out of cache: while the pool is full new requests wait;
//! - each request keeps its own sampling settings, seed and random stream ([`RowPick`]):
//!   the noise of a row depends on its own (seed, step, row) only, so a seeded request gives
//!   the same ids alone or batched with others (up to the float rounding of a larger batch).

use std::collections::{HashMap, VecDeque};

use lavit_runtime::{Error, Result};
use tch::{Device, Kind, Tensor};

use crate::generate::{allow_bias, pick_rows, repetition_penalty, RowPick, Sampling};
use crate::modeling_llama::{KvPool, LlamaForCausalLM, PagedArgs};
use crate::vocab::UnifiedVocab;

mod pick;

/// The sizes an [`Engine`] schedules within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Sequences in the running set.
    pub max_seqs: usize,
    /// Prompt positions prefilled per step.
    pub max_prefill_tokens: i64,
    /// Blocks in the KV pool.
    pub kv_blocks: usize,
    /// Positions per block.
    pub block_size: i64,
}

impl EngineLimits {
    /// Limits that refuse nothing (a library call sizes its engine to its requests).
    pub fn unbounded() -> Self {
        EngineLimits {
            max_seqs: usize::MAX,
            max_prefill_tokens: i64::MAX,
            kv_blocks: usize::MAX,
            block_size: 16,
        }
    }

    /// The limits of a stage's [`lavit_runtime::stage::Batching`]: the pool holds
    /// `kv_cache_mib` MiB of `bytes_per_position`-byte positions.
    pub fn from_batching(b: &lavit_runtime::stage::Batching, bytes_per_position: i64) -> Self {
        let bs = b.kv_block_size.max(1) as i64;
        let bytes = b.kv_cache_mib as i64 * (1 << 20);
        EngineLimits {
            max_seqs: b.llm_max_seqs.max(1),
            max_prefill_tokens: b.llm_max_prefill_tokens.max(1) as i64,
            kv_blocks: (bytes / (bytes_per_position.max(1) * bs)).clamp(1, MAX_BLOCKS as i64)
                as usize,
            block_size: bs,
        }
    }

    /// Blocks a sequence of `positions` positions reserves.
    pub fn blocks_for(&self, positions: i64) -> usize {
        ((positions.max(1) + self.block_size - 1) / self.block_size) as usize
    }
}

/// One sequence: a stream of positions in the KV pool.
struct Seq {
    /// (P, H) prompt embeddings; positions `prefilled..` are still to prefill.
    prompt: Tensor,
    prompt_len: i64,
    prefilled: i64,
    /// Blocks of the pool holding its positions (reserved on admission).
    blocks: Vec<u32>,
    /// Positions in the cache.
    len: i64,
    /// The token to feed at the next decoding step.
    next: Option<i64>,
    /// (V,) logits of its last position, waiting for its group's pick.
    logits: Option<Tensor>,
    /// Still running (a finished sample or caption leaves the batch).
    live: bool,
}

/// What a request asks the engine for.
pub enum GroupKind {
    /// Image tokens: `n` samples; with `guidance` α their `n` unconditional twins follow
    /// them in the group's sequences.
    Image { n: usize, guidance: Option<f64> },
    /// Text: one answer per prompt (`beams` sequences each when > 1: beam search).
    Text {
        prompts: usize,
        beams: i64,
        repetition_penalty: f64,
        length_penalty: f64,
        /// Report each new token of prompt 0 as it is picked (no beams).
        stream: bool,
    },
}

/// A request as the engine runs it.
pub struct Group {
    pub kind: GroupKind,
    seqs: Vec<Seq>,
    sampling: Sampling,
    seed: u64,
    /// The first row of this group in its random stream (a multi-prompt call of the
    /// library functions shares one stream, prompt-major).
    pub rng_row0: i64,
    min_new: i64,
    max_new: i64,
    /// Tokens picked so far (the random stream's step).
    step: i64,
    /// Per sample / prompt: the ids generated so far.
    out: Vec<Vec<i64>>,
    done: Vec<bool>,
    blocks_needed: usize,
    beam: Option<BeamState>,
    /// With [`Engine::trace`]: per sample / prompt, the scores of each of its picks (V,)
    /// on the CPU (guidance applied, before the allowed-ids bias).
    pub scores: Vec<Vec<Tensor>>,
}

/// Beam search of a text group on the device (as `generate_text_with` did it for one batch).
struct BeamState {
    /// (S,) cumulative log-probs, (S,) generated lengths, (S,) finished, (S, L) tokens.
    scores: Tensor,
    lens: Tensor,
    done: Tensor,
    tokens: Tensor,
}

/// What a finished request gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// Per sample its ids (visual ids, and [/IMG] last when the model closed the image).
    Image(Vec<Vec<i64>>),
    /// Per prompt its ids without the EOS, and the positions it read.
    Text {
        ids: Vec<Vec<i64>>,
        prompt_lens: Vec<usize>,
    },
}

impl Group {
    /// A request over `prompts` (P_i, H) embeddings (one per sequence, in the order
    /// [`GroupKind`] describes), its sampling settings and limits.
    pub fn new(
        kind: GroupKind,
        prompts: Vec<Tensor>,
        sampling: Sampling,
        seed: u64,
        min_new: i64,
        max_new: i64,
    ) -> Self {
        let seqs: Vec<Seq> = prompts
            .into_iter()
            .map(|p| {
                let n = p.size()[0];
                Seq {
                    prompt: p,
                    prompt_len: n,
                    prefilled: 0,
                    blocks: Vec::new(),
                    len: 0,
                    next: None,
                    logits: None,
                    live: true,
                }
            })
            .collect();
        let outs = match &kind {
            GroupKind::Image { n, .. } => *n,
            GroupKind::Text { prompts, .. } => *prompts,
        };
        Group {
            kind,
            seqs,
            sampling,
            seed,
            rng_row0: 0,
            min_new,
            max_new,
            step: 0,
            out: vec![Vec::new(); outs],
            done: vec![false; outs],
            blocks_needed: 0,
            beam: None,
            scores: (0..outs).map(|_| Vec::new()).collect(),
        }
    }

    /// Sequences it runs.
    pub fn seqs(&self) -> usize {
        self.seqs.len()
    }

    /// KV blocks it reserves in an engine of `limits`.
    pub fn blocks_needed(&self, limits: &EngineLimits) -> usize {
        self.seqs
            .iter()
            .map(|s| limits.blocks_for(s.prompt_len + self.max_new))
            .sum()
    }

    /// The ids generated so far, per sample / prompt.
    pub fn generated(&self) -> &[Vec<i64>] {
        &self.out
    }

    /// Whether sample / prompt `i` has finished.
    pub fn is_done(&self, i: usize) -> bool {
        self.done[i]
    }

    fn beams(&self) -> i64 {
        match self.kind {
            GroupKind::Text { beams, .. } => beams,
            GroupKind::Image { .. } => 1,
        }
    }
}

/// The running set of one LLM (see the module docs).
pub struct Engine {
    limits: EngineLimits,
    pool: Option<KvPool>,
    free: Vec<u32>,
    groups: HashMap<u64, Group>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    running_seqs: usize,
    /// (4, V) additive biases: visual only, visual or [/IMG], text only, text but EOS.
    biases: Option<Tensor>,
    /// Tokens picked so far (every sample, caption and beam).
    tokens: u64,
    /// Keep every pick's scores in its group (tests of batched against alone).
    trace: bool,
    /// Finished requests kept for [`Engine::take_traced`] when tracing.
    traced: HashMap<u64, Group>,
}

/// The most blocks a pool has (their free list lives on the host).
pub const MAX_BLOCKS: usize = 1 << 24;

const VISUAL: i64 = 0;
const VISUAL_OR_END: i64 = 1;
const TEXT: i64 = 2;
const TEXT_NO_EOS: i64 = 3;

impl Engine {
    /// An engine within `limits` (at most [`MAX_BLOCKS`] blocks); the KV pool is allocated
    /// by the first step.
    pub fn new(limits: EngineLimits) -> Self {
        let limits = EngineLimits {
            kv_blocks: limits.kv_blocks.min(MAX_BLOCKS),
            ..limits
        };
        Engine {
            limits,
            pool: None,
            free: (0..limits.kv_blocks as u32).rev().collect(),
            groups: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            running_seqs: 0,
            biases: None,
            tokens: 0,
            trace: false,
            traced: HashMap::new(),
        }
    }

    /// Keep the scores of every pick in its request's group ([`Group::scores`]), and
    /// finished groups for [`Engine::take_traced`] (tests).
    pub fn trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// A finished request's group, kept while tracing.
    pub fn take_traced(&mut self, key: u64) -> Option<Group> {
        self.traced.remove(&key)
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Requests held (waiting or running).
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Requests waiting to be admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// KV blocks reserved by running requests, and the pool's size.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (
            self.limits.kv_blocks - self.free.len(),
            self.limits.kv_blocks,
        )
    }

    /// Tokens picked so far, over every request (every sample, caption and beam).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// A request's group (its progress).
    pub fn group(&self, key: u64) -> Option<&Group> {
        self.groups.get(&key)
    }

    /// Queue a request. One that could never run (more sequences than the running set
    /// takes, more blocks than the pool has) is refused now.
    pub fn add(&mut self, key: u64, mut group: Group) -> Result<()> {
        group.blocks_needed = group.blocks_needed(&self.limits);
        if group.seqs.is_empty() {
            return Err(Error::invalid("a request without sequences"));
        }
        if group.seqs.len() > self.limits.max_seqs {
            return Err(Error::invalid(format!(
                "the request runs {} sequences, more than the running batch takes ({}, \
                 pipeline.batching.llm_max_seqs)",
                group.seqs.len(),
                self.limits.max_seqs
            )));
        }
        if group.blocks_needed > self.limits.kv_blocks {
            return Err(Error::invalid(format!(
                "the request needs {} KV blocks of {} positions, more than the pool holds \
                 ({}, pipeline.batching.kv_cache_mib)",
                group.blocks_needed, self.limits.block_size, self.limits.kv_blocks
            )));
        }
        if self.groups.contains_key(&key) {
            return Err(Error::invalid(format!("request {key} is already running")));
        }
        self.groups.insert(key, group);
        self.waiting.push_back(key);
        Ok(())
    }

    /// Admit waiting requests, in order, while their sequences and blocks fit; the keys of
    /// the running set (the next step's members).
    pub fn plan(&mut self) -> Vec<u64> {
        while let Some(&key) = self.waiting.front() {
            let Some(g) = self.groups.get_mut(&key) else {
                self.waiting.pop_front();
                continue;
            };
            if self.running_seqs + g.seqs.len() > self.limits.max_seqs
                || g.blocks_needed > self.free.len()
            {
                break;
            }
            for s in &mut g.seqs {
                let n = self.limits.blocks_for(s.prompt_len + g.max_new);
                let at = self.free.len() - n;
                s.blocks = self.free.split_off(at);
            }
            self.running_seqs += g.seqs.len();
            self.running.push(key);
            self.waiting.pop_front();
        }
        self.running.clone()
    }

    /// Forget a request (cancelled, failed), freeing its blocks.
    pub fn remove(&mut self, key: u64) {
        self.detach(key);
    }

    /// Take a request out: off the queue and the running set, its blocks back in the pool.
    fn detach(&mut self, key: u64) -> Option<Group> {
        self.waiting.retain(|&k| k != key);
        let mut g = self.groups.remove(&key)?;
        if let Some(pos) = self.running.iter().position(|&k| k == key) {
            self.running.remove(pos);
            for s in &mut g.seqs {
                if !s.blocks.is_empty() {
                    self.free.append(&mut s.blocks);
                }
                if s.live {
                    self.running_seqs -= 1;
                    s.live = false;
                }
            }
        }
        Some(g)
    }

    /// Forget everything (after a failed step: its requests are failed by the caller).
    pub fn clear(&mut self) {
        let keys: Vec<u64> = self.groups.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
    }

    fn slot(&self, s: &Seq, pos: i64) -> i64 {
        let bs = self.limits.block_size;
        1 + s.blocks[(pos / bs) as usize] as i64 * bs + pos % bs
    }

    fn ensure_pool(&mut self, model: &LlamaForCausalLM, vocab: &UnifiedVocab) -> Result<()> {
        if self.pool.is_none() {
            let slots = 1 + self.limits.kv_blocks as i64 * self.limits.block_size;
            self.pool = Some(KvPool::new(
                &model.config,
                slots,
                model.device(),
                model.kind(),
            )?);
        }
        if self.biases.is_none() {
            let (v, dev) = (vocab.vocab_size, model.device());
            let eos = vocab.eos_id;
            let rows = [
                allow_bias(v, |i| vocab.is_visual(i), dev),
                allow_bias(v, |i| vocab.is_visual(i) || i == vocab.image_end_id, dev),
                allow_bias(v, |i| vocab.is_text(i), dev),
                allow_bias(v, |i| vocab.is_text(i) && i != eos, dev),
            ];
            self.biases = Some(Tensor::stack(&rows, 0));
        }
        Ok(())
    }

    /// One iteration over the running set: prefill chunks, one decoding position of every
    /// other sequence, then a pick for every request whose sequences all have logits.
    /// `on_token(key, id)` hears each new token of a streaming request; the finished
    /// requests are returned (and leave the engine).
    pub fn step(
        &mut self,
        model: &LlamaForCausalLM,
        vocab: &UnifiedVocab,
        on_token: &mut dyn FnMut(u64, i64),
    ) -> Result<Vec<(u64, Finished)>> {
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_pool(model, vocab)?;
        let _g = tch::no_grad_guard();
        self.prefill(model)?;
        self.decode(model)?;
        self.pick(vocab, on_token)?;
        Ok(self.collect_finished())
    }

    /// Prefill the next chunk of every prompt not yet in the cache, within the step's
    /// budget, in one right-padded forward; a prompt that completes keeps its last logits.
    fn prefill(&mut self, model: &LlamaForCausalLM) -> Result<()> {
        let mut budget = self.limits.max_prefill_tokens.max(1);
        let mut rows: Vec<(u64, usize, i64, i64)> = Vec::new(); // key, seq, start, count
        for &key in &self.running {
            let Some(g) = self.groups.get(&key) else {
                continue;
            };
            for (i, s) in g.seqs.iter().enumerate() {
                if budget == 0 {
                    break;
                }
                if s.live && s.prefilled < s.prompt_len {
                    let t = (s.prompt_len - s.prefilled).min(budget);
                    rows.push((key, i, s.prefilled, t));
                    budget -= t;
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let b = rows.len() as i64;
        let t_max = rows.iter().map(|r| r.3).max().unwrap_or(1);
        let tk = rows.iter().map(|r| r.2 + r.3).max().unwrap_or(1);
        let (mut embeds, mut pos, mut write, mut read, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (row, &(key, i, start, t)) in rows.iter().enumerate() {
            let s = &self.groups[&key].seqs[i];
            let chunk = s.prompt.narrow(0, start, t); // (t, H)
            embeds.push(if t < t_max {
                let pad =
                    Tensor::zeros([t_max - t, chunk.size()[1]], (chunk.kind(), chunk.device()));
                Tensor::cat(&[&chunk, &pad], 0)
            } else {
                chunk
            });
            for j in 0..t_max {
                pos.push(if j < t { start + j } else { 0 });
                write.push(if j < t { self.slot(s, start + j) } else { 0 });
            }
            for j in 0..tk {
                read.push(if j < start + t { self.slot(s, j) } else { 0 });
            }
            last.push(row as i64 * t_max + t - 1);
        }
        let embeds = Tensor::stack(&embeds, 0)
            .to_device(model.device())
            .to_kind(model.kind()); // (B, T, H)
        let h = self.forward(model, &embeds, b, t_max, tk, pos, write, read)?; // (B, T, H)
        let h = h
            .reshape([b * t_max, -1])
            .index_select(0, &self.ids(&last, model.device()));
        let logits = model.head(&h).to_kind(Kind::Float); // (B, V)
        for (row, &(key, i, start, t)) in rows.iter().enumerate() {
            if let Some(g) = self.groups.get_mut(&key) {
                let s = &mut g.seqs[i];
                s.prefilled = start + t;
                s.len = start + t;
                if s.prefilled == s.prompt_len {
                    s.logits = Some(logits.get(row as i64));
                }
            }
        }
        Ok(())
    }

    /// One decoding position of every sequence that has a token to feed.
    fn decode(&mut self, model: &LlamaForCausalLM) -> Result<()> {
        let mut rows: Vec<(u64, usize)> = Vec::new();
        for &key in &self.running {
            if let Some(g) = self.groups.get(&key) {
                for (i, s) in g.seqs.iter().enumerate() {
                    if s.live && s.next.is_some() {
                        rows.push((key, i));
                    }
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let b = rows.len() as i64;
        let tk = rows
            .iter()
            .map(|&(k, i)| self.groups[&k].seqs[i].len + 1)
            .max()
            .unwrap_or(1);
        let (mut ids, mut pos, mut write, mut read) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(key, i) in &rows {
            let s = &self.groups[&key].seqs[i];
            ids.push(s.next.unwrap_or(0));
            pos.push(s.len);
            write.push(self.slot(s, s.len));
            for j in 0..tk {
                read.push(if j <= s.len { self.slot(s, j) } else { 0 });
            }
        }
        let dev = model.device();
        // The engine's own picks: in the vocabulary (checked when the prompts were built).
        let embeds = model.embed(&self.ids(&ids, dev).view([b, 1])); // (B, 1, H)
        let h = self.forward(model, &embeds, b, 1, tk, pos, write, read)?; // (B, 1, H)
        let logits = model.head(&h.select(1, 0)).to_kind(Kind::Float); // (B, V)
        for (row, &(key, i)) in rows.iter().enumerate() {
            if let Some(g) = self.groups.get_mut(&key) {
                let s = &mut g.seqs[i];
                s.len += 1;
                s.next = None;
                s.logits = Some(logits.get(row as i64));
            }
        }
        Ok(())
    }

    fn ids(&self, v: &[i64], dev: Device) -> Tensor {
        Tensor::from_slice(v).to_device(dev)
    }

    /// The paged forward of `b` rows of `t` new positions each over keys of `tk` positions.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        model: &LlamaForCausalLM,
        embeds: &Tensor,
        b: i64,
        t: i64,
        tk: i64,
        pos: Vec<i64>,
        write: Vec<i64>,
        read: Vec<i64>,
    ) -> Result<Tensor> {
        let dev = model.device();
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| Error::invalid("the KV pool is not allocated"))?;
        // Every query sees every key when each row's queries are its last t positions and
        // all rows have tk of them: no mask for one decoding position, the causal rule for
        // whole prompts from position 0 (a batch of one, or of equal lengths).
        let last = |r: usize| pos[r * t as usize + t as usize - 1];
        let full = (0..b as usize).all(|r| last(r) + 1 == tk && pos[r * t as usize] == tk - t);
        // (SDPA's causal rule aligns the queries to the first keys: only for t == tk.)
        let plain = full && (t == 1 || t == tk);
        let positions = self.ids(&pos, dev).view([b, t]);
        let mask = (!plain).then(|| {
            Tensor::arange(tk, (Kind::Int64, dev))
                .view([1, 1, 1, tk])
                .le_tensor(&positions.view([b, 1, t, 1])) // (B, 1, T, Tk)
        });
        let at = PagedArgs {
            positions: &positions,
            write: &self.ids(&write, dev),
            read: &self.ids(&read, dev),
            tk,
            mask: mask.as_ref(),
            causal: plain && t > 1,
        };
        model.forward_paged(embeds, pool, &at)
    }
}
