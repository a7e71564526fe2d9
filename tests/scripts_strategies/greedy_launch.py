"""Cook a greedy soup (1 process, or N under `accelerate launch`) and write what each rank saw as JSON."""

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
    args = parser.parse_args()
    state = process_state()
    evaluation = {
        "dataset": {"load_from_disk": args.data},
        "selection_split": "validation",
        "report_splits": ["test", "shift"],
        "batch_size": 16,
    }
    soup = SoupBuilder(args.ingredients, method="greedy", evaluation=evaluation).cook(args.output, progress=False)
    result = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "trace": soup.record["strategy"]["trace"],
        "evaluations": soup.record["strategy"]["evaluations"],
        "report": soup.record["report"]["rows"],
    }
    Path(f"{args.output}.rank-{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
