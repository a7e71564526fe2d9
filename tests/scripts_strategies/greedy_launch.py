"""Cook a greedy (or, with --search, a search) soup, in 1 process or N under `accelerate launch`, and write what
each rank saw as JSON."""

import argparse
import json
from pathlib import Path

from hf_soup import SoupBuilder
from hf_soup.scoring import process_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ingredients", nargs="+", required=True)
    parser.add_argument("--data", required=True, help="a DatasetDict saved with save_to_disk")
    parser.add_argument("--output", required=True)
    parser.add_argument("--search", help="the search strategy's parameters as JSON, instead of greedy")
    args = parser.parse_args()
    state = process_state()
    evaluation = {
        "dataset": {"load_from_disk": args.data},
        "selection_split": "validation",
        "report_splits": ["test", "shift"],
        "batch_size": 16,
    }
    options = {"method": "search", "trials": 6, **json.loads(args.search)} if args.search else {"method": "greedy"}
    soup = SoupBuilder(args.ingredients, evaluation=evaluation, **options).cook(args.output, progress=False)
    result = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "trace": soup.record["strategy"].get("trace"),
        "history": soup.record["strategy"].get("history"),
        "evaluations": soup.record["strategy"]["evaluations"],
        "report": soup.record["report"]["rows"],
    }
    Path(f"{args.output}.rank-{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
