//! The picking half of a step of the [`Engine`]: the next token of every ready request in one
//! vectorised pick (guidance, biases, penalties, each request's own random stream), beam
//! search, and the requests that finish.

use super::*;

impl Engine {
    /// Pick the next token of every request whose live sequences all have logits: one
    /// vectorised pick over the rows of every such request (beam search apart).
    pub(super) fn pick(
        &mut self,
        vocab: &UnifiedVocab,
        on_token: &mut dyn FnMut(u64, i64),
    ) -> Result<()> {
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
    pub(super) fn apply(
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
    pub(super) fn retire(&mut self, key: u64) {
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
    pub(super) fn beam_step(
        &mut self,
        key: u64,
        vocab: &UnifiedVocab,
        biases: &Tensor,
    ) -> Result<()> {
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
    pub(super) fn copy_beams(&mut self, key: u64, src: &[i64]) -> Result<()> {
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
    pub(super) fn collect_finished(&mut self) -> Vec<(u64, Finished)> {
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
    pub(super) fn push(
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
    pub(super) fn pick(
        &self,
        biases: &Tensor,
        penalties: &[Penalty],
    ) -> Result<(Vec<i64>, Option<Tensor>)> {
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
