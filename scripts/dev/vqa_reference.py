#!/usr/bin/env python3
"""Reference values for `lavit eval`'s VQA accuracy (tests/data/vqa-references.json).

Runs the official VQA evaluation algorithm (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, `VQAEval.evaluate`, `processPunctuation`,
`processDigitArticle`), written out below for Python 3 from the official file, on the crafted
questions of tests/data/vqa-cases.json, and prints per question the accuracy (the value the
official code averages, before its rounding to a percentage with 2 decimals) and the overall
accuracy. tests/eval.rs compares src/eval/vqa.rs with it to 1e-12.

The official code's quirks are kept: normalisation only when the ten human answers are not
all the same string; `re.UNICODE` given to `periodStrip.sub` as its `count` (at most 32
periods removed); the capitalised contraction keys; each answer a dict with its
`answer_id`, so a leave-one-out subset leaves out exactly one answer.

    .venv/bin/python scripts/dev/vqa_reference.py tests/data/vqa-cases.json > tests/data/vqa-references.json
"""
import json
import re
import sys

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"
}

MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!"]


def process_punctuation(in_text):
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # As the official code calls it: re.UNICODE lands in `count`.
    out_text = PERIOD_STRIP.sub("", out_text, re.UNICODE)
    return out_text


def process_digit_article(in_text):
    out_text = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.setdefault(word, word)
        if word not in ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def clean(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(answers, prediction):
    """`VQAEval.evaluate`'s body for one question: answers as the annotation's dicts."""
    gt_answers_dicts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    for ans_dic in gt_answers_dicts:
        ans_dic["answer"] = clean(ans_dic["answer"])
    res_ans = clean(prediction)
    gt_acc = []
    gt_answers = [ans["answer"] for ans in gt_answers_dicts]
    if len(set(gt_answers)) > 1:
        for ans_dic in gt_answers_dicts:
            ans_dic["answer"] = process_punctuation(ans_dic["answer"])
            ans_dic["answer"] = process_digit_article(ans_dic["answer"])
        res_ans = process_punctuation(res_ans)
        res_ans = process_digit_article(res_ans)
    for gt_ans_datum in gt_answers_dicts:
        other_gt_ans = [item for item in gt_answers_dicts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        acc = min(1, float(len(matching_ans)) / 3)
        gt_acc.append(acc)
    return float(sum(gt_acc)) / len(gt_acc)


def main(path):
    cases = json.load(open(path, encoding="utf-8"))["questions"]
    acc_qa = []
    rows = []
    for q in cases:
        acc = question_accuracy(q["answers"], q["prediction"])
        acc_qa.append(acc)
        rows.append({"id": q["id"], "accuracy": acc, "percent": round(100 * acc, 2)})
    overall = float(sum(acc_qa)) / len(acc_qa)
    out = {
        "source": "scripts/dev/vqa_reference.py (the official vqaEval.py algorithm) on "
                  "tests/data/vqa-cases.json",
        "questions": rows,
        "overall": overall,
        "overall_percent": round(100 * overall, 2),
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
