"""The Hugging Face Hub side of `ds4-mlx convert`: downloading the checkpoint, uploading the result."""

from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from .safetensors_reader import INDEX_FILE, CheckpointError
from .writer import TOKENIZER_FILES

CHECKPOINT_FILES = ["config.json", INDEX_FILE, "*.safetensors", *TOKENIZER_FILES, "*.jinja", "encoding/*"]


def checkpoint_dir(hf_path: str) -> Path:
    """A local checkpoint directory for --hf-path: the path itself if it exists or looks like a path
    (absolute, ./, ../, ~, or not of the form owner/name), else a repo id downloaded into the Hugging Face
    cache (resumable: files already there are not fetched again)."""
    path = Path(hf_path).expanduser()
    if path.exists() or hf_path.startswith((".", "/", "~")) or hf_path.count("/") != 1:
        return path
    try:
        return Path(snapshot_download(hf_path, allow_patterns=CHECKPOINT_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{hf_path} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({reason}). If you are offline or the Hub is unreachable, download the checkpoint elsewhere "
            f"and pass its local directory as --hf-path."
        ) from None


def upload(path: Path, repo_id: str):
    """Upload a converted model directory to the model repo `repo_id` (created if needed; resumable)."""
    api = HfApi()
    api.create_repo(repo_id=repo_id, exist_ok=True)
    api.upload_large_folder(folder_path=str(path), repo_id=repo_id, repo_type="model")
