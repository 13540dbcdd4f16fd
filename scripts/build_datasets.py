#!/usr/bin/env python3
"""Build the project's classification and chat datasets from package contents.

Standard library only; deterministic (seed 13). Called by
scripts/fetch_assets.sh, which downloads and unpacks the packages.

  build_datasets.py vader HUTTO_DIR DATA_DIR
      HUTTO_DIR: the unpacked hutto_ICWSM_2014/ folder of vaderSentiment 3.3.2.
      Writes DATA_DIR/sentiment/{train,valid,test}.csv  (text,label: positive|negative)
             DATA_DIR/source4/{train,valid,test}.csv    (text,label: movie|tweet|amazon|nyt)

  build_datasets.py chatterbot ENGLISH_DIR OUT_DIR
      ENGLISH_DIR: chatterbot_corpus/data/english/ of chatterbot-corpus 1.3.3.
      Writes OUT_DIR/{pairs,train,valid}.jsonl  ({"prompt": ..., "response": ...})

Cleaning, applied the same way everywhere (see the report printed by each step):
  * the ground-truth files are UTF-8 with CRLF line ends and no final newline;
    each line must have exactly 3 tab-separated fields (id, rating, sentence);
  * HTML entities left in the text (&amp; &lt; &gt; ...) are decoded, runs of
    whitespace are collapsed to one space and the text is stripped;
  * sentences repeated within a file (case-insensitively) are merged (sentiment:
    their ratings are averaged; source4: the first is kept), and sentences that
    occur in more than one source are dropped from source4, so that no sentence
    is in two splits or has two labels;
  * splits are stratified by label: each class is shuffled with
    random.Random(13) and cut 80/10/10, then each split is shuffled.
"""

import csv
import glob
import json
import os
import random
import re
import sys
from collections import Counter, OrderedDict

SEED = 13

VADER_FILES = OrderedDict([
    ("movie", "movieReviewSnippets_GroundTruth.txt"),
    ("tweet", "tweets_GroundTruth.txt"),
    ("amazon", "amazonReviewSnippets_GroundTruth.txt"),
    ("nyt", "nytEditorialSnippets_GroundTruth.txt"),
])
POS_MIN, NEG_MAX = 0.5, -0.5

_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_WS = re.compile(r"\s+")


def _entity(m):
    name = m.group(1)
    if name.startswith("#x"):
        return chr(int(name[2:], 16))
    if name.startswith("#"):
        return chr(int(name[1:]))
    return _ENTITIES[name]


def clean_text(s):
    return _WS.sub(" ", _ENTITY.sub(_entity, s)).strip()


def _atomic_write(path, write_fn):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        write_fn(f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# VADER ground truth

def read_ground_truth(path, stats):
    """Return [(id, rating, raw_text)] and record format quirks in `stats`."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        stats["bom"] += 1
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["latin1_fallback"] += 1
        text = raw.decode("cp1252", errors="replace")
    stats["crlf"] += text.count("\r\n")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            stats["blank_lines"] += 1
            continue
        parts = line.split("\t")
        if len(parts) > 3:  # stray tabs inside the sentence: keep them as text
            stats["extra_tabs"] += 1
            parts = parts[:2] + [" ".join(parts[2:])]
        if len(parts) != 3:
            stats["bad_lines"] += 1
            sys.stderr.write("  warning: %s:%d: %d fields, skipped: %r\n"
                             % (os.path.basename(path), lineno, len(parts),
                                line[:80]))
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            stats["bad_rating"] += 1
            continue
        if not -4.0 <= rating <= 4.0:
            stats["rating_out_of_range"] += 1
            continue
        rows.append((parts[0].strip(), rating, parts[2]))
    if not text.endswith("\n"):
        stats["no_final_newline"] += 1
    return rows


def stratified_split(items, label_of, rng):
    """items: list in a fixed order. Returns (train, valid, test)."""
    by_label = OrderedDict()
    for it in items:
        by_label.setdefault(label_of(it), []).append(it)
    train, valid, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n = len(group)
        n_valid = int(round(n * 0.1))
        n_test = int(round(n * 0.1))
        n_train = n - n_valid - n_test
        train += group[:n_train]
        valid += group[n_train:n_train + n_valid]
        test += group[n_train + n_valid:]
    for split in (train, valid, test):
        rng.shuffle(split)
    return train, valid, test


def write_csv(path, rows):
    def w(f):
        wr = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        wr.writerow(["text", "label"])
        wr.writerows(rows)
    _atomic_write(path, w)


def report_counts(name, splits, labels):
    print("  %-10s %7s  %s" % (name, "rows", "  ".join("%8s" % l for l in labels)))
    for split_name, rows in splits:
        c = Counter(label for _, label in rows)
        print("  %-10s %7d  %s" % (split_name, len(rows),
                                   "  ".join("%8d" % c[l] for l in labels)))


def build_vader(hutto_dir, data_dir):
    stats = Counter()
    per_source = OrderedDict()
    for source, fname in VADER_FILES.items():
        path = os.path.join(hutto_dir, fname)
        per_source[source] = read_ground_truth(path, stats)
    print("  read: " + ", ".join("%s %d" % (s, len(r))
                                 for s, r in per_source.items())
          + " (total %d)" % sum(len(r) for r in per_source.values()))
    entity_rows = sum(1 for rows in per_source.values() for _, _, t in rows
                      if _ENTITY.search(t))
    quirks = ["UTF-8, CRLF line ends (%d)" % stats["crlf"],
              "%d file(s) without final newline" % stats["no_final_newline"],
              "%d rows with HTML entities decoded" % entity_rows]
    for k in ("bom", "latin1_fallback", "extra_tabs", "bad_lines",
              "bad_rating", "rating_out_of_range", "blank_lines"):
        if stats[k]:
            quirks.append("%s: %d" % (k, stats[k]))
    print("  format: " + "; ".join(quirks))

    # -- binary sentiment from the movie reviews -----------------------------
    merged = OrderedDict()  # key -> [text, sum, count]
    for _, rating, raw in per_source["movie"]:
        text = clean_text(raw)
        if not text:
            continue
        key = text.lower()
        if key in merged:
            merged[key][1] += rating
            merged[key][2] += 1
        else:
            merged[key] = [text, rating, 1]
    n_dup = len(per_source["movie"]) - len(merged)
    items, dropped = [], 0
    for text, total, count in merged.values():
        r = total / count
        if r >= POS_MIN:
            items.append((text, "positive"))
        elif r <= NEG_MAX:
            items.append((text, "negative"))
        else:
            dropped += 1
    print("  sentiment: %d movie sentences, %d duplicates merged (ratings "
          "averaged), %d neutral (-0.5 < rating < 0.5) dropped, %d kept"
          % (len(per_source["movie"]), n_dup, dropped, len(items)))
    rng = random.Random(SEED)
    splits = stratified_split(items, lambda it: it[1], rng)
    out = os.path.join(data_dir, "sentiment")
    os.makedirs(out, exist_ok=True)
    names = ("train", "valid", "test")
    for name, rows in zip(names, splits):
        write_csv(os.path.join(out, name + ".csv"), rows)
    report_counts("sentiment", list(zip(names, splits)), ["negative", "positive"])

    # -- 4-way source classification -------------------------------------------
    first = OrderedDict()  # key -> (text, source)
    sources_of = {}
    n_dup = 0
    for source, rows in per_source.items():
        for _, _, raw in rows:
            text = clean_text(raw)
            if not text:
                continue
            key = text.lower()
            srcs = sources_of.setdefault(key, set())
            if source in srcs:
                n_dup += 1
                continue
            srcs.add(source)
            if key not in first:
                first[key] = (text, source)
    cross = {k for k, s in sources_of.items() if len(s) > 1}
    items = [v for k, v in first.items() if k not in cross]
    print("  source4: %d sentences, %d repeats within a source removed, "
          "%d sentences found in two sources dropped, %d kept"
          % (sum(len(r) for r in per_source.values()), n_dup, len(cross),
             len(items)))
    rng = random.Random(SEED)
    splits = stratified_split(items, lambda it: it[1], rng)
    out = os.path.join(data_dir, "source4")
    os.makedirs(out, exist_ok=True)
    for name, rows in zip(names, splits):
        write_csv(os.path.join(out, name + ".csv"), rows)
    report_counts("source4", list(zip(names, splits)), list(VADER_FILES))


# ---------------------------------------------------------------------------
# chatterbot-corpus: a parser for the small YAML subset the corpus uses

class YamlSubsetError(Exception):
    pass


def _fold(lines):
    """YAML line folding for flow scalars: a single line break becomes a
    space, n empty lines become n newlines; continuation lines are stripped."""
    out = ""
    pending_breaks = 0
    for i, line in enumerate(lines):
        s = line.strip(" \t") if i else line.rstrip(" \t")
        if i and not s:
            pending_breaks += 1
            continue
        if i:
            out += "\n" * pending_breaks if pending_breaks else " "
            pending_breaks = 0
        out += s
    return out


def _strip_comment(s):
    m = re.search(r"(^|\s)#", s)
    return s[:m.start()].rstrip() if m else s


_DQ_ESC = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n",
           "v": "\v", "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"',
           "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028",
           "P": "\u2029"}


def _scalar(first, cont, where):
    """Parse one scalar value: `first` is the text after the `- ` marker,
    `cont` the raw continuation lines (blank lines included)."""
    while cont and not cont[-1].strip():
        cont = cont[:-1]
    head = first.strip()
    if head[:1] in ("|", ">"):
        m = re.match(r"^([|>])([-+]?)([1-9]?)([-+]?)\s*(#.*)?$", head)
        if not m:
            raise YamlSubsetError("%s: bad block scalar header %r" % (where, head))
        style, chomp = m.group(1), (m.group(2) or m.group(4))
        body = [l for l in cont]
        nonblank = [l for l in body if l.strip()]
        if not nonblank:
            return ""
        indent = int(m.group(3)) if m.group(3) else min(
            len(l) - len(l.lstrip(" ")) for l in nonblank[:1])
        lines = [l[indent:] if l.strip() else "" for l in body]
        if style == "|":
            text = "\n".join(lines)
        else:  # folded: join non-indented runs with spaces
            text = ""
            for i, l in enumerate(lines):
                if i == 0:
                    text = l
                elif not l or l.startswith((" ", "\t")) or not lines[i - 1] \
                        or lines[i - 1].startswith((" ", "\t")):
                    text += "\n" + l
                else:
                    text += " " + l
        if chomp == "-":
            return text
        return text + "\n"
    if head[:1] == "'":
        folded = _fold([first.lstrip()] + cont)
        out, i = [], 1
        while i < len(folded):
            c = folded[i]
            if c == "'":
                if folded[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                rest = _strip_comment(folded[i + 1:]).strip()
                if rest:
                    raise YamlSubsetError("%s: text after closing quote: %r"
                                          % (where, rest))
                return "".join(out)
            out.append(c)
            i += 1
        raise YamlSubsetError("%s: unterminated single-quoted string" % where)
    if head[:1] == '"':
        # escaped line breaks ("\" at end of line) join without a space
        lines = [first.lstrip()] + cont
        joined = []
        for l in lines:
            if joined and joined[-1].rstrip().endswith("\\") and \
                    not joined[-1].rstrip().endswith("\\\\"):
                joined[-1] = joined[-1].rstrip()[:-1] + l.lstrip()
            else:
                joined.append(l)
        folded = _fold(joined)
        out, i = [], 1
        while i < len(folded):
            c = folded[i]
            if c == "\\":
                e = folded[i + 1:i + 2]
                if e in _DQ_ESC:
                    out.append(_DQ_ESC[e])
                    i += 2
                elif e in ("x", "u", "U"):
                    n = {"x": 2, "u": 4, "U": 8}[e]
                    out.append(chr(int(folded[i + 2:i + 2 + n], 16)))
                    i += 2 + n
                else:
                    raise YamlSubsetError("%s: bad escape \\%s" % (where, e))
                continue
            if c == '"':
                rest = _strip_comment(folded[i + 1:]).strip()
                if rest:
                    raise YamlSubsetError("%s: text after closing quote: %r"
                                          % (where, rest))
                return "".join(out)
            out.append(c)
            i += 1
        raise YamlSubsetError("%s: unterminated double-quoted string" % where)
    return _fold([_strip_comment(first.lstrip())] +
                 [_strip_comment(l) for l in cont])


def parse_corpus_yaml(text, name="?"):
    """Parse a chatterbot-corpus file: `categories:` (list of strings) and
    `conversations:` (list of lists of strings). Returns
    (categories, conversations, notes)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    categories, conversations, notes = [], [], []
    section = None
    cur = None  # [kind, first_text, cont_lines, lineno]

    def flush():
        nonlocal cur
        if cur is None:
            return
        kind, first, cont, ln = cur
        val = _scalar(first, cont, "%s:%d" % (name, ln))
        if section == "categories":
            categories.append(val)
        elif kind == "new":
            conversations.append([val])
        else:
            if not conversations:
                raise YamlSubsetError("%s:%d: turn before any conversation"
                                      % (name, ln))
            conversations[-1].append(val)
        cur = None

    for ln, line in enumerate(lines, 1):
        if line.startswith("#") or (not line.strip() and cur is None):
            continue
        m = re.match(r"^([A-Za-z_]+):\s*(#.*)?$", line)
        if m:
            flush()
            section = m.group(1)
            if section not in ("categories", "conversations"):
                raise YamlSubsetError("%s:%d: unexpected key %r"
                                      % (name, ln, section))
            continue
        m = re.match(r"^ *-( |$)", line)
        if section == "categories" and m:
            flush()
            cur = ["cat", line[m.end():], [], ln]
        elif section == "conversations" and re.match(r"^- -( |$)", line):
            flush()
            cur = ["new", line[4:], [], ln]
        elif section == "conversations" and re.match(r"^  -( |$)", line):
            flush()
            cur = ["turn", line[4:], [], ln]
        elif section == "conversations" and re.match(r"^-( |$)", line):
            # malformed: "- text" where "- - text" was meant. Taken as the
            # first turn of a new conversation (PyYAML would instead fold the
            # following "  - answer" line into one long plain string).
            flush()
            notes.append((len(conversations), "%s:%d: '- ' without the second '- ' read as a new "
                "conversation" % (name, ln)))
            cur = ["new", line[2:], [], ln]
        elif cur is not None and (not line.strip() or line.startswith("   ")
                                  or (cur[0] == "cat" and line.startswith(" "))):
            cur[2].append(line)
        else:
            raise YamlSubsetError("%s:%d: cannot parse line %r"
                                  % (name, ln, line))
    flush()
    return categories, conversations, notes


def build_chatterbot(english_dir, out_dir):
    files = sorted(glob.glob(os.path.join(english_dir, "*.yml")))
    if not files:
        raise SystemExit("no *.yml files in %s" % english_dir)
    pairs, notes, n_conv, n_dup = [], [], 0, 0
    seen = set()
    per_file = []
    try:
        import yaml  # optional: only used to cross-check the parser
    except ImportError:
        yaml = None
    mismatches = 0
    for path in files:
        name = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cats, convs, file_notes = parse_corpus_yaml(text, name)
        notes += [msg for _, msg in file_notes]
        if yaml is not None:
            ref = yaml.safe_load(text.lstrip("\ufeff"))
            repaired = {i for i, _ in file_notes}
            # PyYAML reads a repaired conversation as one folded string
            ref_convs = [c for c in ref.get("conversations", [])
                         if isinstance(c, list)]
            mine = [c for i, c in enumerate(convs) if i not in repaired]
            if ref_convs != mine or ref.get("categories") != cats:
                mismatches += 1
                sys.stderr.write("  warning: %s parses differently with "
                                 "PyYAML\n" % name)
        n_file = 0
        for conv in convs:
            n_conv += 1
            turns = [t.strip() for t in conv]
            for a, b in zip(turns, turns[1:]):
                if not a or not b:
                    continue
                if (a, b) in seen:
                    n_dup += 1
                    continue
                seen.add((a, b))
                pairs.append({"prompt": a, "response": b})
                n_file += 1
        per_file.append("%s %d" % (name[:-4], n_file))
    for n in notes:
        print("  quirk: " + n)
    if yaml is not None:
        print("  cross-check with PyYAML: %s" % (
            "identical apart from the quirk(s) above" if not mismatches
            else "%d file(s) differ" % mismatches))
    print("  %d files, %d conversations, %d turn pairs (%d exact duplicate "
          "pairs removed)" % (len(files), n_conv, len(pairs), n_dup))
    print("  per file: " + ", ".join(per_file))

    rng = random.Random(SEED)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_valid = int(round(len(pairs) * 0.05))
    valid = [pairs[i] for i in order[:n_valid]]
    train = [pairs[i] for i in order[n_valid:]]
    os.makedirs(out_dir, exist_ok=True)

    def writer(rows):
        def w(f):
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return w
    _atomic_write(os.path.join(out_dir, "train.jsonl"), writer(train))
    _atomic_write(os.path.join(out_dir, "valid.jsonl"), writer(valid))
    _atomic_write(os.path.join(out_dir, "pairs.jsonl"), writer(pairs))
    print("  pairs.jsonl %d, train.jsonl %d, valid.jsonl %d"
          % (len(pairs), len(train), len(valid)))


def main(argv):
    if len(argv) == 4 and argv[1] == "vader":
        build_vader(argv[2], argv[3])
        return 0
    if len(argv) == 4 and argv[1] == "chatterbot":
        build_chatterbot(argv[2], argv[3])
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
