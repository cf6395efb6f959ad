"""Does putting the document before the task's instructions cost answer quality? Both layouts on the same model.

    .venv/bin/python benchmarks/prompt_layout.py --docs 16 --out /tmp/layout          # the packaged model, CPU

docbatch's built-in prompts put the document first and the instructions after it, so that a document's tasks share
its prefix (`engine_throughput.py`'s workload T measures the speed side). This measures the quality side: generated
contracts (summarize) and financial reports (extract) whose facts are known, answered under each task's schema by the
engine a worker would run, once with docbatch's layout and once with the conventional one (instructions, then the
document; everything else equal). Per layout and task: answers that validate at the first try, answers cut off by
max_new_tokens, fields filled (not null), and facts right (both parties named; the governing law's country; the
company's name; the revenue figure). Writes <out>/layout.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import instruction_first  # noqa: E402
from schemas.states import DocbatchError  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402
from worker.answers.prompts import build_text_prompt, validate_json  # noqa: E402
from worker.engine.request import GenerationOptions, ModelInput  # noqa: E402
from worker.service.process import start_engine  # noqa: E402

COMPANIES = ["Northwind Analytics Ltd", "Harbour Freight plc", "Atlas Components AG", "Helios Energy SAS",
             "Kestrel Software Inc", "Bramble Foods BV", "Meridian Leasing SpA", "Cobalt Mining Pty Ltd"]
LAWS = [("England and Wales", "England"), ("the State of New York", "New York"), ("Germany", "Germany"),
        ("France", "France"), ("Ontario", "Ontario"), ("the Netherlands", "Netherlands")]


def contract(rng: random.Random) -> tuple[str, dict]:
    supplier, customer = rng.sample(COMPANIES, 2)
    law, country = rng.choice(LAWS)
    fee, days, months = rng.randrange(5, 90) * 1000, rng.choice([14, 30, 45, 60]), rng.choice([12, 24, 36])
    text = (f"SERVICES AGREEMENT\n\nThis Services Agreement is made on {rng.randrange(1, 28)} March 2024 between "
            f"{supplier} (the \"Supplier\") and {customer} (the \"Customer\").\n\n1. Services. The Supplier shall "
            f"provide data processing and support services as described in Schedule 1.\n2. Term. This Agreement "
            f"starts on 1 April 2024 and continues for {months} months, renewing for successive 12-month periods "
            f"unless either party gives 90 days' written notice.\n3. Fees. The Customer shall pay EUR {fee:,} per "
            f"month, each invoice payable within {days} days of receipt.\n4. Liability. Each party's aggregate "
            f"liability is capped at the fees paid in the preceding 12 months.\n5. Termination. Either party may "
            f"terminate for a material breach not remedied within 30 days of notice.\n6. Governing law. This "
            f"Agreement is governed by the laws of {law}.\n")
    return text, {"parties": [supplier, customer], "country": country}


def report(rng: random.Random) -> tuple[str, dict]:
    company = rng.choice(COMPANIES)
    revenue = rng.randrange(100, 9000) * 100
    cost, opex = round(revenue * rng.uniform(0.4, 0.6)), round(revenue * rng.uniform(0.1, 0.2))
    text = (f"{company}\nAnnual report for the year ended 31 December 2023\n\nAll figures in EUR thousands.\n\n"
            f"Income statement\nRevenue {revenue:,}\nCost of revenue {cost:,}\nOperating income {revenue - cost - opex:,}\n"
            f"Net income {round((revenue - cost - opex) * 0.75):,}\nBasic earnings per share (EUR) 1.{rng.randrange(10, 99)}\n\n"
            f"Balance sheet at 31 December 2023\nTotal assets {revenue * 2:,}\nTotal liabilities {revenue:,}\n"
            f"Equity {revenue:,}\nCash and cash equivalents {round(revenue * 0.2):,}\n")
    return text, {"company": company, "revenue": revenue}


def facts_right(task: str, answer: dict, facts: dict) -> int:
    if task == "summarize":
        named = " ".join(str(p) for p in answer.get("parties") or []).lower()
        return sum(party.lower().split()[0] in named for party in facts["parties"]) + \
            (facts["country"].lower() in str(answer.get("governing_law") or "").lower())
    return (facts["company"].lower().split()[0] in str(answer.get("company") or "").lower()) + \
        (answer.get("revenue") == facts["revenue"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=16, help="documents per task")
    parser.add_argument("--home", type=Path, default=Path.home() / ".docbatch")
    parser.add_argument("--out", type=Path, default=Path("layout-out"))
    args = parser.parse_args()
    settings = Settings(home=args.home, model=args.model)
    rt = start_engine(settings, "bench@layout")  # as an infer worker starts it
    engine, tokenizer = rt.engine, rt.tokenizer
    rng = random.Random(0)
    documents = {"summarize": [contract(rng) for _ in range(args.docs)],
                 "extract": [report(rng) for _ in range(args.docs)]}
    limit = settings.max_new_tokens
    options = GenerationOptions(repetition_penalty=settings.repetition_penalty)
    rows = []
    for task_name, docs in documents.items():
        task = builtin_task(task_name, settings)
        for layout, render in (("document-first", task.render), ("instruction-first",
                                                                  lambda text, task=task: instruction_first(task, text))):
            started = time.perf_counter()
            futures = [engine.submit(ModelInput(build_text_prompt(tokenizer, render, text, 4096)
                                                .model_input.token_ids, json_schema=task.schema_text), limit, options)
                       for text, _ in docs]
            valid = cut = filled = fields = right = 0
            for future, (_, facts) in zip(futures, docs):
                tokens = future.result().token_ids
                cut += len(tokens) >= limit
                try:
                    answer = validate_json(task.schema_text, tokenizer.decode(tokens, skip_special_tokens=True),
                                           task.output_model)
                except DocbatchError:
                    continue
                valid += 1
                filled += sum(value not in (None, [], "") for value in answer.values())
                fields += len(answer)
                right += facts_right(task_name, answer, facts)
            rows.append({"task": task_name, "layout": layout, "docs": len(docs), "valid": valid, "cut_off": cut,
                         "fields_filled": round(filled / fields, 3) if fields else None, "facts_right": right,
                         "facts": 3 * len(docs) if task_name == "summarize" else 2 * len(docs),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    engine.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layout.json").write_text(json.dumps({"model": args.model, "engine": type(engine).__name__, "rows": rows},
                                                     indent=1))
    print(f"\nmodel {args.model}, {type(engine).__name__}, max_new_tokens {limit}")
    print("| task | layout | valid at first try | cut off | fields filled | facts right |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['task']} | {r['layout']} | {r['valid']} / {r['docs']} | {r['cut_off']} | "
              f"{r['fields_filled'] if r['fields_filled'] is not None else '-'} | {r['facts_right']} / {r['facts']} |")


if __name__ == "__main__":
    main()
