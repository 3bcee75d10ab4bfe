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

    /// Pick the next token of every request whose live sequences all have logits: one
    /// vectorised pick over the rows of every such request (beam search apart).
    fn pick(&mut self, vocab: &UnifiedVocab, on_token: &mut dyn FnMut(u64, i64)) -> Result<()> {
        let ready: Vec<u64> = self
            .running
            .iter()
            .copied()
            .filter(|k| {
                self.groups.get(k).is_some_and(|g| {
                    g.seqs.iter().any(|s| s.live)
                        && g.seqs.iter().all(|s| !s.live || s.logits.is_some())
                })
            })
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let biases = self
            .biases
            .as_ref()
            .ok_or_else(|| Error::invalid("the engine has no biases"))?
            .shallow_clone();
        let mut rows = PickRows::default();
        let mut penalties: Vec<Penalty> = Vec::new();
        let (beams, plain): (Vec<u64>, Vec<u64>) = ready
            .iter()
            .partition(|k| self.groups.get(k).is_some_and(|g| g.beams() > 1));
        for &key in &plain {
            let g = &self.groups[&key];
            let open = g.step < g.min_new;
            match g.kind {
                GroupKind::Image { n, guidance } => {
                    let b = if open { VISUAL } else { VISUAL_OR_END };
                    for s in 0..n {
                        let Some(c) = g.seqs[s].logits.as_ref().filter(|_| !g.done[s]) else {
                            continue;
                        };
                        let u =
                            guidance.and_then(|a| g.seqs[n + s].logits.as_ref().map(|u| (u, a)));
                        rows.push(key, g, s, c, u, b);
                    }
                }
                GroupKind::Text {
                    prompts,
                    repetition_penalty,
                    ..
                } => {
                    let b = if open { TEXT_NO_EOS } else { TEXT };
                    let (mut mine, mut seen) = (Vec::new(), Vec::new());
                    for p in 0..prompts {
                        let Some(c) = g.seqs[p].logits.as_ref().filter(|_| !g.done[p]) else {
                            continue;
                        };
                        mine.push(rows.push(key, g, p, c, None, b));
                        seen.push(g.out[p].clone());
                    }
                    if repetition_penalty != 1.0 && g.step > 0 {
                        penalties.push((mine, repetition_penalty, seen));
                    }
                }
            }
        }
        let (picked, scores) = rows.pick(&biases, &penalties)?;
        if let (true, Some(scores)) = (self.trace, scores) {
            let scores = scores.to_device(Device::Cpu);
            for (i, &(key, row)) in rows.owners.iter().enumerate() {
                if let Some(g) = self.groups.get_mut(&key) {
                    g.scores[row].push(scores.get(i as i64));
                }
            }
        }
        self.tokens += picked.len() as u64;
        for ((key, row), id) in rows.owners.into_iter().zip(picked) {
            self.apply(key, row, id, vocab, on_token);
        }
        for key in &plain {
            if let Some(g) = self.groups.get_mut(key) {
                g.step += 1;
                for s in &mut g.seqs {
                    s.logits = None;
                }
                if g.step >= g.max_new {
                    g.done.iter_mut().for_each(|d| *d = true);
                }
            }
        }
        for key in beams {
            self.beam_step(key, vocab, &biases)?;
        }
        // Finished samples and captions leave the batch at once.
        for key in plain {
            self.retire(key);
        }
        Ok(())
    }

    /// Record the token `id` picked for sample / prompt `row` of request `key`.
    fn apply(
        &mut self,
        key: u64,
        row: usize,
        id: i64,
        vocab: &UnifiedVocab,
        on_token: &mut dyn FnMut(u64, i64),
    ) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        match g.kind {
            GroupKind::Image { n, guidance } => {
                g.out[row].push(id);
                if id == vocab.image_end_id {
                    g.done[row] = true;
                } else {
                    g.seqs[row].next = Some(id);
                    if guidance.is_some() {
                        g.seqs[n + row].next = Some(id);
                    }
                }
            }
            GroupKind::Text { stream, .. } => {
                if id == vocab.eos_id {
                    g.done[row] = true;
                } else {
                    g.out[row].push(id);
                    g.seqs[row].next = Some(id);
                    if stream && row == 0 {
                        on_token(key, id);
                    }
                }
            }
        }
    }

    /// Free the sequences of finished samples / prompts (not beams: they reorder until the
    /// end).
    fn retire(&mut self, key: u64) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        if g.beams() > 1 {
            return;
        }
        let n_out = g.out.len();
        for (i, s) in g.seqs.iter_mut().enumerate() {
            let owner = i % n_out; // the unconditional twin of sample s is s + n
            if s.live && g.done[owner] {
                s.live = false;
                s.next = None;
                self.free.append(&mut s.blocks);
                self.running_seqs -= 1;
            }
        }
    }

    /// One beam-search pick of a text group with beams (its own forward rows): the k best
    /// continuations of each prompt, the cache reordered by copying the chosen beams'
    /// positions.
    fn beam_step(&mut self, key: u64, vocab: &UnifiedVocab, biases: &Tensor) -> Result<()> {
        let Some(g) = self.groups.get(&key) else {
            return Ok(());
        };
        let GroupKind::Text {
            prompts,
            beams: k,
            repetition_penalty: penalty,
            ..
        } = g.kind
        else {
            return Ok(());
        };
        let rows: Vec<Tensor> = g
            .seqs
            .iter()
            .map(|s| s.logits.as_ref().map(|l| l.shallow_clone()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::invalid("a beam without logits"))?;
        let l = Tensor::stack(&rows, 0); // (S, V)
        let dev = l.device();
        let (b, s, v) = (prompts as i64, prompts as i64 * k, vocab.vocab_size);
        let eos = vocab.eos_id;
        let st = match &g.beam {
            Some(st) => BeamState {
                scores: st.scores.shallow_clone(),
                lens: st.lens.shallow_clone(),
                done: st.done.shallow_clone(),
                tokens: st.tokens.shallow_clone(),
            },
            None => {
                // Only the first beam of each prompt is live at the start (the others are
                // copies).
                let scores = Tensor::zeros([b, k], (Kind::Float, dev));
                let _ = scores.narrow(1, 1, k - 1).fill_(-1e9);
                BeamState {
                    scores: scores.view([s]),
                    lens: Tensor::zeros([s], (Kind::Float, dev)),
                    done: Tensor::zeros([s], (Kind::Bool, dev)),
                    tokens: Tensor::zeros([s, 0], (Kind::Int64, dev)),
                }
            }
        };
        let l = repetition_penalty(&l, &st.tokens, penalty);
        let which = if g.step < g.min_new {
            TEXT_NO_EOS
        } else {
            TEXT
        };
        let eos_only = allow_bias(v, |i| i == eos, dev);
        let bias = eos_only
            .view([1, v])
            .where_self(&st.done.view([s, 1]), &biases.get(which).view([1, v]));
        let lp = (l + bias).log_softmax(-1, Kind::Float);
        // A finished beam continues only with EOS, at log-prob 0.
        let lp = eos_only.view([1, v]).where_self(&st.done.view([s, 1]), &lp);
        let cand = (st.scores.view([s, 1]) + lp).view([b, k * v]);
        let (top, idx) = cand.topk(k, -1, true, true); // (B, k)
        let src_beam = idx.divide_scalar_mode(v, "floor");
        let tok = idx.remainder(v).view([s]);
        let src = (src_beam + Tensor::arange(b, (Kind::Int64, dev)).view([b, 1]) * k).view([s]);
        let done = st.done.index_select(0, &src);
        let lens = st.lens.index_select(0, &src);
        let tokens = st.tokens.index_select(0, &src);
        let next = Tensor::from(eos).to_device(dev).where_self(&done, &tok);
        let lens = &lens + done.logical_not().to_kind(Kind::Float);
        let tokens = Tensor::cat(&[&tokens, &next.view([s, 1])], 1);
        let done = done.logical_or(&next.eq(eos));
        let host = Vec::<i64>::try_from(
            &Tensor::cat(&[&src, &next, &done.to_kind(Kind::Int64)], 0).to_device(Device::Cpu),
        )
        .map_err(|e| Error::invalid(format!("reading beams: {e}")))?;
        let (src_h, rest) = host.split_at(s as usize);
        let (next_h, done_h) = rest.split_at(s as usize);
        // Reorder the cache: beam j takes the positions of its source beam.
        self.copy_beams(key, src_h)?;
        let Some(g) = self.groups.get_mut(&key) else {
            return Ok(());
        };
        g.beam = Some(BeamState {
            scores: top.view([s]),
            lens,
            done,
            tokens,
        });
        g.step += 1;
        self.tokens += s as u64;
        for (j, seq) in g.seqs.iter_mut().enumerate() {
            seq.logits = None;
            seq.next = Some(next_h[j]);
        }
        let all_done = done_h.iter().all(|&d| d != 0);
        if all_done || g.step >= g.max_new {
            // Best beam of each prompt by score / length^length_penalty.
            let GroupKind::Text { length_penalty, .. } = g.kind else {
                return Ok(());
            };
            let Some(st) = g.beam.as_ref() else {
                return Ok(());
            };
            let norm = &st.scores / st.lens.clamp_min(1.0).pow_tensor_scalar(length_penalty);
            let j = norm.view([b, k]).argmax(-1, false);
            let best = j + Tensor::arange(b, (Kind::Int64, dev)) * k;
            let rows = st.tokens.index_select(0, &best).to_device(Device::Cpu);
            let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&rows)
                .map_err(|e| Error::invalid(format!("reading beams: {e}")))?;
            for (p, r) in rows.into_iter().enumerate() {
                g.out[p] = r.into_iter().take_while(|&i| i != eos).collect();
                g.done[p] = true;
            }
        }
        Ok(())
    }

    /// Copy, in every layer, the cached positions of beam `src[j]` into beam `j` of group
    /// `key` (all beams of a prompt have the same length).
    fn copy_beams(&mut self, key: u64, src: &[i64]) -> Result<()> {
        let Some(g) = self.groups.get(&key) else {
            return Ok(());
        };
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (j, &sj) in src.iter().enumerate() {
            if sj as usize == j {
                continue;
            }
            let (a, b) = (&g.seqs[sj as usize], &g.seqs[j]);
            for p in 0..b.len {
                from.push(self.slot(a, p));
                to.push(self.slot(b, p));
            }
        }
        if from.is_empty() {
            return Ok(());
        }
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| Error::invalid("the KV pool is not allocated"))?;
        let dev = pool.layers[0].0.device();
        let (from, to) = (self.ids(&from, dev), self.ids(&to, dev));
        for (k, v) in &pool.layers {
            for t in [k, v] {
                let rows = t.index_select(0, &from);
                let _ = t.shallow_clone().index_copy_(0, &to, &rows);
            }
        }
        Ok(())
    }

    /// Take out the requests whose every sample / prompt is done.
    fn collect_finished(&mut self) -> Vec<(u64, Finished)> {
        let done: Vec<u64> = self
            .running
            .iter()
            .copied()
            .filter(|k| {
                self.groups
                    .get(k)
                    .is_some_and(|g| g.done.iter().all(|&d| d))
            })
            .collect();
        let mut out = Vec::new();
        for key in done {
            let Some(g) = self.groups.get(&key) else {
                continue;
            };
            let fin = match g.kind {
                GroupKind::Image { .. } => Finished::Image(g.out.clone()),
                GroupKind::Text { beams, .. } => Finished::Text {
                    ids: g.out.clone(),
                    prompt_lens: g
                        .seqs
                        .iter()
                        .step_by(beams.max(1) as usize)
                        .map(|s| s.prompt_len as usize)
                        .collect(),
                },
            };
            if let (Some(g), true) = (self.detach(key), self.trace) {
                self.traced.insert(key, g);
            }
            out.push((key, fin));
        }
        out
    }
}

/// The rows of one vectorised pick: each a sample or caption of a request, its logits row
/// (and its unconditional twin's under guidance), its bias and its random stream.
#[derive(Default)]
struct PickRows {
    logits: Vec<Tensor>,
    cond: Vec<i64>,
    uncond: Vec<i64>,
    alpha: Vec<f32>,
    guided: Vec<bool>,
    bias: Vec<i64>,
    picks: Vec<RowPick>,
    owners: Vec<(u64, usize)>,
}

impl PickRows {
    /// Add sample / prompt `row` of request `key` (group `g`); its index among the rows.
    fn push(
        &mut self,
        key: u64,
        g: &Group,
        row: usize,
        c: &Tensor,
        u: Option<(&Tensor, f64)>,
        bias: i64,
    ) -> i64 {
        self.cond.push(self.logits.len() as i64);
        self.logits.push(c.shallow_clone());
        match u {
            Some((u, a)) => {
                self.uncond.push(self.logits.len() as i64);
                self.logits.push(u.shallow_clone());
                self.alpha.push(a as f32);
                self.guided.push(true);
            }
            None => {
                self.uncond.push(self.logits.len() as i64 - 1);
                self.alpha.push(0.0);
                self.guided.push(false);
            }
        }
        self.bias.push(bias);
        self.picks.push(RowPick {
            sampling: g.sampling.clone(),
            seed: g.seed,
            step: g.step as u64,
            row: g.rng_row0 + row as i64,
        });
        self.owners.push((key, row));
        self.owners.len() as i64 - 1
    }

    /// Scores (guidance, repetition penalty, the allowed ids) and one pick per row, read to
    /// the host; and the scores before the allowed-ids bias.
    fn pick(&self, biases: &Tensor, penalties: &[Penalty]) -> Result<(Vec<i64>, Option<Tensor>)> {
        if self.owners.is_empty() {
            return Ok((Vec::new(), None));
        }
        let dev = self.logits[0].device();
        let idx = |v: &[i64]| Tensor::from_slice(v).to_device(dev);
        let l = Tensor::stack(&self.logits, 0); // (S, V)
        let r = self.owners.len() as i64;
        let c = l.index_select(0, &idx(&self.cond)); // (R, V)
        let mut scores = if self.guided.iter().any(|&g| g) {
            // eq. 7: l = lsm(uncond) + α·(lsm(cond) − lsm(uncond))
            let lsm = l.log_softmax(-1, Kind::Float);
            let lc = lsm.index_select(0, &idx(&self.cond));
            let lu = lsm.index_select(0, &idx(&self.uncond));
            let a = Tensor::from_slice(&self.alpha).to_device(dev).view([r, 1]);
            let on = Tensor::from_slice(&self.guided).to_device(dev).view([r, 1]);
            (&lu + (&lc - &lu) * a).where_self(&on, &c)
        } else {
            c
        };
        for (rows, p, seen) in penalties {
            let at = idx(rows);
            let seen = Tensor::from_slice2(seen).to_device(dev);
            let part = repetition_penalty(&scores.index_select(0, &at), &seen, *p);
            scores = scores.index_copy(0, &at, &part);
        }
        let biased = &scores + biases.index_select(0, &idx(&self.bias));
        let ids = pick_rows(&biased, &self.picks).to_device(Device::Cpu);
        let ids = Vec::<i64>::try_from(&ids)
            .map_err(|e| Error::invalid(format!("reading picked ids: {e}")))?;
        Ok((ids, Some(scores)))
    }
}

/// A repetition penalty over some pick rows: (the rows, the penalty, per row the ids it has
/// seen).
type Penalty = (Vec<i64>, f64, Vec<Vec<i64>>);
