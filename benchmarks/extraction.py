"""PDF text-layer extraction (pypdf vs pypdfium2) and Tesseract OCR throughput, on generated PDFs.

    .venv/bin/python benchmarks/extraction.py --pages 200 --out /tmp/extraction-bench

1. Writes `--pages` A4 pages with reportlab (contracts and annual reports, 20-30 pages a file) from known
   source text: prose with € é ü —, headings and body in several sizes, plain-text tables ("Revenue  84,250
   76,910"), a header and a "Page n of N" footer; every 4th page has a 2-column body (drawn left column first);
   about half the pages hyphenate long words at line ends and half are justified with every word drawn on its
   own (no space glyphs, so word gaps must be inferred). Even files use the standard Type 1 fonts, odd files
   embedded DejaVu TrueType subsets.
2. Text layer: pypdf `extract_text()` (plain and layout mode) and pypdfium2 `get_text_range()`, each over the
   whole set in one process; median wall time of `--repeats` runs, opening the files included.
3. OCR: renders the pages with pypdfium2 at `--dpi` to grayscale PIL images (timed on its own), then
   `pytesseract.image_to_string(img, lang="eng")` in this process, then render+OCR in a pool of `--workers`
   processes. Tesseract's OpenMP threads are capped with OMP_THREAD_LIMIT=`--omp-threads` (default 1).
   `--ocr-pages N` limits OCR to the first N pages; `--psm6-pages N` compares `--psm 6` on the first N.
Fidelity: difflib.SequenceMatcher ratio between the source words of a page and the extracted words (NFC and
whitespace normalised, nothing else), so dropped, changed, merged and reordered words all cost. 2-column pages
are also scored against a line-interleaved reading to tell which order a library produces.
Writes <out>/results.json (all numbers, per page scores, page metadata) and <out>/texts.json (extractions).
"""
import argparse, json, os, platform, random, resource, statistics, sys, time, unicodedata
from concurrent.futures import ProcessPoolExecutor
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path

import pypdf, pypdfium2 as pdfium, pytesseract
from reportlab.lib.pagesizes import A4
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FAMILIES = [("Times-Roman", "Times-Bold", "Courier"), ("DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSansMono")]
PARTIES = ["Müller Logistik GmbH", "Société Générale de Café SA", "Northwind Traders Ltd", "Zürich Components AG",
           "Crédit Agricole Leasing", "Atlas Freight plc", "Bäckerei Jürgens KG", "Helios Énergie SAS"]
CONTRACT = [
    "The Supplier shall deliver the Goods to the Customer's premises within {n} business days of each order.",
    "Each undisputed invoice shall be paid within {n} days of receipt, failing which interest accrues at {p} percent.",
    "The total fee payable under this Agreement is €{m}, exclusive of value added tax, payable quarterly.",
    "Neither party is liable for indirect loss — including loss of profit, revenue or goodwill — under this Agreement.",
    "{a} may terminate this Agreement by written notice if {b} commits a material breach not remedied in {n} days.",
    "All intellectual property rights in the Deliverables shall vest in the Customer upon payment in full.",
    "This Agreement is governed by the laws of England and Wales; the courts of London have exclusive jurisdiction.",
    "The aggregate liability of {a} shall not exceed €{m} in any contract year, save for fraud or wilful misconduct.",
    "Confidential Information disclosed by {b} shall be used solely for the performance of this Agreement."]
REPORT = [
    "Revenue increased by {p} percent to €{m} thousand, driven by higher volumes in the café and logistics segments.",
    "Operating expenses rose to €{m} thousand as the Group invested in the Zürich distribution centre.",
    "The Board recommends a final dividend of {n} cents per share — an increase of {p} percent on the prior year.",
    "Net debt at the year end was €{m} thousand, or {p} times adjusted EBITDA, well within covenant headroom.",
    "Cash generated from operations amounted to €{m} thousand, after working capital outflows of €{n} thousand.",
    "The principal risks facing the Group are described on page {n}, together with the mitigating actions.",
    "Goodwill is tested annually for impairment; none was recognised in the year ({p} percent headroom).",
    "Our subsidiary {a} contributed €{m} thousand of revenue following its acquisition in the third quarter."]
ROWS = ["Revenue", "Cost of sales", "Gross profit", "Distribution costs", "Administrative expenses", "Operating profit",
        "Finance income", "Finance costs", "Profit before tax", "Income tax expense", "Profit for the year"]
HEADINGS = ["Definitions", "Payment Terms", "Liability", "Financial Review", "Outlook", "Governance"]
ODD = ["\ufffe", "\x02", "\xad", "\ufb01", "\ufb02", "\r", "\ufffd"]  # counted in every extraction
(W, H), MARGIN, GAP = A4, 60, 24


def sentence(rng, pool):
    a, b = rng.sample(PARTIES, 2)
    return rng.choice(pool).format(a=a, b=b, n=rng.randint(5, 90), p=round(rng.uniform(1, 12), 1),
                                   m=f"{rng.randint(50, 99999):,}")


def wrap(words, font, size, width, hyphenate):
    """Greedy line breaking; with `hyphenate`, long words that overflow are split ('settle-' / 'ment')."""
    lines, cur = [], ""
    for word in words:
        if pdfmetrics.stringWidth(f"{cur} {word}".strip(), font, size) <= width:
            cur = f"{cur} {word}".strip()
            continue
        if hyphenate and len(word) >= 9 and word.isalpha():
            for cut in range(len(word) - 3, 3, -1):
                if pdfmetrics.stringWidth(f"{cur} {word[:cut]}-".strip(), font, size) <= width:
                    cur, word = f"{cur} {word[:cut]}-".strip(), word[cut:]
                    break
        lines += [cur] if cur else []
        cur = word
    return lines + [cur]


def body_lines(rng, pool, font, size, width, hyphenate, count):
    lines = []
    while len(lines) < count:
        para = " ".join(sentence(rng, pool) for _ in range(rng.randint(2, 5)))
        lines += wrap(para.split(), font, size, width, hyphenate) + [""]
    return lines[:count]


def draw_lines(c, lines, x, y, lead, font, size, width, justify):
    """Lines top-down; `justify` draws each word on its own, spread to the full width (not paragraph ends)."""
    for i, line in enumerate(lines):
        parts, nxt = line.split(), lines[i + 1] if i + 1 < len(lines) else ""
        if not (justify and nxt and len(parts) > 1):
            c.drawString(x, y - i * lead, line)
            continue
        gap, pos = (width - sum(pdfmetrics.stringWidth(w, font, size) for w in parts)) / (len(parts) - 1), x
        for w in parts:
            c.drawString(pos, y - i * lead, w)
            pos += pdfmetrics.stringWidth(w, font, size) + gap


def make_pdf(path: Path, doc: int, n_pages: int, rng: random.Random) -> list[dict]:
    """Writes one PDF; returns per page its source lines in reading order (and row-wise order if 2-column)."""
    regular, bold, mono = FAMILIES[doc % 2]
    contract, size = doc % 4 < 2, rng.choice([9, 10, 10.5, 11])
    pool, title = (CONTRACT, "Master Services Agreement") if contract else (REPORT, f"Annual Report {2015 + doc}")
    c, pages = canvas.Canvas(str(path), pagesize=A4), []
    for p in range(1, n_pages + 1):
        lead, two_col, hyph, just = size * 1.35, p % 4 == 0, rng.random() < 0.5, rng.random() < 0.5
        header = f"{PARTIES[doc % len(PARTIES)]} — {title} — Confidential"
        c.setFont(regular, 8); c.drawString(MARGIN, H - 40, header)
        src, y = [header], H - 75
        if p == 1 or rng.random() < 0.3:
            src.append(f"{p}. {rng.choice(HEADINGS)}")
            c.setFont(bold, rng.choice([14, 16])); c.drawString(MARGIN, y, src[-1]); y -= 30
        if not contract or rng.random() < 0.25:  # plain-text table in a monospaced font
            year = 2015 + doc
            c.setFont(mono, 9)
            table = [f"{'(in € thousands)':<26}{year:>10}{year - 1:>10}"] + [
                f"{r:<26}{rng.randint(1000, 99999):>10,}{rng.randint(1000, 99999):>10,}"
                for r in rng.sample(ROWS, rng.randint(4, 7))]
            for line in table:
                c.drawString(MARGIN, y, line); src.append(line); y -= 12
            y -= 12
        n, cols = int((y - 70) // lead), 2 if two_col else 1
        colw = (W - 2 * MARGIN - GAP * (cols - 1)) / cols
        lines = body_lines(rng, pool, regular, size, colw, hyph, cols * n)
        chunks = [lines[k * n:(k + 1) * n] for k in range(cols)]
        c.setFont(regular, size)
        for k, col in enumerate(chunks):
            draw_lines(c, col, MARGIN + k * (colw + GAP), y, lead, regular, size, colw, just)
        footer = f"Page {p} of {n_pages}"
        c.setFont(regular, 8); c.drawCentredString(W / 2, 35, footer)
        row_wise = src + [" ".join(r) for r in zip(*chunks)] + [footer] if two_col else None
        pages.append({"file": path.name, "page": p - 1, "two_col": two_col, "hyphenated": hyph, "justified": just,
                      "fonts": "truetype" if doc % 2 else "type1", "src": src + lines + [footer], "row_wise": row_wise})
        c.showPage()
    c.save()
    return pages


def generate(folder: Path, pages: int, seed: int) -> list[dict]:
    for name in FAMILIES[1]:
        pdfmetrics.registerFont(TTFont(name, f"{FONT_DIR}/{name}.ttf"))
    folder.mkdir(parents=True, exist_ok=True)
    rng, out, doc = random.Random(seed), [], 0
    while len(out) < pages:
        out += make_pdf(folder / f"doc{doc:02d}.pdf", doc, min(rng.randint(20, 30), pages - len(out)), rng)
        doc += 1
    return out


def score(ref_lines: list[str], got: str) -> float:
    ref, got = (unicodedata.normalize("NFC", t).split() for t in (" ".join(ref_lines), got))
    return SequenceMatcher(None, ref, got, autojunk=False).ratio()


def pypdf_texts(files, mode="plain"):
    return [page.extract_text(extraction_mode=mode) for f in files for page in pypdf.PdfReader(f).pages]


def pdfium_texts(files):
    out = []
    for f in files:
        doc = pdfium.PdfDocument(f)
        for page in doc:
            textpage = page.get_textpage()
            out.append(textpage.get_text_range())
            textpage.close(); page.close()
        doc.close()
    return out


@lru_cache(maxsize=4)
def _open(path):
    return pdfium.PdfDocument(path)


def render(path, index, dpi):
    page = _open(path)[index]
    img = page.render(scale=dpi / 72, grayscale=True).to_pil()
    page.close()
    return img


def render_and_ocr(job):
    path, index, dpi, config = job
    t0 = time.perf_counter(); img = render(path, index, dpi)
    t1 = time.perf_counter(); text = pytesseract.image_to_string(img, lang="eng", config=config)
    return text, t1 - t0, time.perf_counter() - t1


def timed(fn, *args):
    """(result, wall s, CPU s of this process and its waited-for children: tesseract, pool workers)."""
    def cpu():
        usage = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return sum(u.ru_utime + u.ru_stime for u in usage)
    t0, c0 = time.perf_counter(), cpu()
    result = fn(*args)
    return result, time.perf_counter() - t0, cpu() - c0


def row(name, meta, secs, cpu_s, texts=None, **extra):
    r = {"stage": name, "pages": len(meta), "seconds": round(secs, 3), "pages_per_s": round(len(meta) / secs, 3),
         "cpu_s": round(cpu_s, 3), "cpu_s_per_page": round(cpu_s / len(meta), 4)}
    if texts is not None:
        s = [score(m["src"], t) for m, t in zip(meta, texts)]
        worst = min(range(len(s)), key=s.__getitem__)
        two = [(score(m["src"], t), score(m["row_wise"], t)) for m, t in zip(meta, texts) if m["two_col"]]
        fixed = [score(m["src"], t.replace("\ufffe", "-\n")) for m, t in zip(meta, texts)]
        r.update(mean_fidelity=round(statistics.mean(s), 4), worst_fidelity=round(s[worst], 4),
                 worst_page=f"{meta[worst]['file']} p{meta[worst]['page'] + 1}",
                 two_col_pages=len(two), two_col_in_column_order=sum(a > b for a, b in two),
                 two_col_mean_fidelity=round(statistics.mean(a for a, _ in two), 4) if two else None,
                 mean_fidelity_fffe_as_hyphen=round(statistics.mean(fixed), 4),
                 odd_chars={repr(ch): sum(t.count(ch) for t in texts) for ch in ODD if any(ch in t for t in texts)})
    print(json.dumps(r | extra), flush=True)
    return r | extra | ({"per_page": [round(x, 4) for x in s]} if texts is not None else {})


def text_layer(meta, files, repeats):
    rows, samples = [], {}
    for name, fn in [("pypdf extract_text (plain)", pypdf_texts), ("pypdfium2 get_text_range", pdfium_texts),
                     ("pypdf extract_text (layout)", lambda f: pypdf_texts(f, "layout"))]:
        runs = [timed(fn, files) for _ in range(repeats)]
        texts, times, cpus = runs[0][0], [r[1] for r in runs], [r[2] for r in runs]
        rows.append(row(name, meta, statistics.median(times), statistics.median(cpus), texts,
                        runs_s=[round(t, 3) for t in times]))
        samples[name] = texts
    return rows, samples


def ocr(meta, folder, dpi, workers, psm6_pages):
    """Render, then OCR, in this process; then render+OCR in a pool; optionally default psm vs --psm 6."""
    jobs, rows, samples = [(str(folder / m["file"]), m["page"], dpi, "") for m in meta], [], {}
    imgs, t_render, c_render = timed(lambda: [render(p, i, d) for p, i, d, _ in jobs])
    rows.append(row(f"pypdfium2 render {dpi} dpi gray, 1 proc", meta, t_render, c_render))
    texts, t_ocr, c_ocr = timed(lambda: [pytesseract.image_to_string(img, lang="eng") for img in imgs])
    rows.append(row("tesseract OCR (excl. render), 1 proc", meta, t_ocr, c_ocr, texts))
    rows.append(row("render + OCR, 1 proc (sum of the two above)", meta, t_render + t_ocr, c_render + c_ocr, texts))
    samples["tesseract, 1 proc"] = texts
    imgs.clear(); _open.cache_clear()  # free the images; the workers open their own documents
    psm = [(" (default psm)", "", jobs[:psm6_pages]), (" --psm 6", "--psm 6", jobs[:psm6_pages])] if psm6_pages else []
    for label, cfg, sub in [("", "", jobs)] + psm:
        def pooled():
            with ProcessPoolExecutor(workers) as pool:
                return list(pool.map(render_and_ocr, [j[:3] + (cfg,) for j in sub]))
        res, wall, cpu_s = timed(pooled)
        texts = [r[0] for r in res]
        rows.append(row(f"render + OCR{label}, {workers} procs", meta[:len(sub)], wall, cpu_s, texts,
                        busy_render_s=round(sum(r[1] for r in res), 2), busy_ocr_s=round(sum(r[2] for r in res), 2)))
        samples[f"tesseract{label}, {workers} procs"] = texts
    return rows, samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/extraction-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dpi", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--omp-threads", default="1", help="OMP_THREAD_LIMIT for tesseract ('' = its default)")
    ap.add_argument("--ocr-pages", type=int, default=None, help="OCR only the first N pages (default: all)")
    ap.add_argument("--psm6-pages", type=int, default=0, help="also OCR the first N pages with --psm 6")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    os.environ.update({"OMP_THREAD_LIMIT": args.omp_threads} if args.omp_threads else {})
    load0 = os.getloadavg()  # other jobs on the machine skew the timings: recorded, not controlled
    meta = generate(args.out / "pdfs", args.pages, args.seed)
    rows, samples = text_layer(meta, sorted({str(args.out / "pdfs" / m["file"]) for m in meta}), args.repeats)
    more = ocr(meta[:args.ocr_pages or len(meta)], args.out / "pdfs", args.dpi, args.workers, args.psm6_pages)
    rows, samples = rows + more[0], samples | more[1]
    machine = {"nproc": os.cpu_count(), "python": platform.python_version(), "pypdf": pypdf.__version__,
               "cpu": next(l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               "pypdfium2": pdfium.version.PYPDFIUM_INFO.version, "pdfium": str(pdfium.version.PDFIUM_INFO),
               "tesseract": str(pytesseract.get_tesseract_version()), "loadavg_start": load0,
               "loadavg_end": os.getloadavg(), "omp_thread_limit": os.environ.get("OMP_THREAD_LIMIT")}
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "results": rows, "pages": meta}
    (args.out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (args.out / "texts.json").write_text(json.dumps(samples, ensure_ascii=False))
    print(f"\n{machine}\n\n| library / stage | pages | seconds | pages/s | CPU s/page | mean fidelity "
          "| worst page fidelity (page) |\n|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fid = f"{r['mean_fidelity']:.4f} | {r['worst_fidelity']:.4f} ({r['worst_page']})" if "per_page" in r else "|"
        print(f"| {r['stage']} | {r['pages']} | {r['seconds']:.2f} | {r['pages_per_s']:.2f} | "
              f"{r['cpu_s_per_page']:.3f} | {fid} |")


if __name__ == "__main__":
    sys.exit(main())
