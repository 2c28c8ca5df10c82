"""Splitting one dataset into pseudo categories: embed every row, cluster with k-means.

Embeddings come from a sentence-transformers model when the package is installed and the model
loads from local files (a directory, or a name already in the local cache); otherwise from the
model being trained (mean-pooled last hidden states). Nothing is ever downloaded. The k-means
fitted on the training rows also assigns the evaluation rows, so evaluation category
`auto_category_3` holds rows like training category `auto_category_3` (the reference clustered
the evaluation set separately, so its names matched nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fms_acceleration.validation import suggestion

from ..errors import AutoCategorizeInputError, ODMConfigError, UnsupportedDatasetError
from .category_stream import sized_length

logger = logging.getLogger(__name__)

try:  # optional; looked up here at call time (tests replace it with a stand-in)
    from sentence_transformers import SentenceTransformer
except ImportError:  # pragma: no cover - depends on the environment
    SentenceTransformer = None

AUTO_CATEGORIZATION_COLUMN_NAME = "auto_categorization_odm_raw_text"
_PROMPT = {"clustering": "Identify the topic or theme based on the text: "}


@dataclass
class AutoCategorizeConfig:
    """How one dataset is split into categories (the reference's fields, plus `model`)."""

    input_column: str = "text"
    num_categories: int | None = None
    min_categories: int = 2
    max_categories: int = 15
    model_name: str | None = "Qwen/Qwen3-Embedding-0.6B"
    batch_size: int = 64
    cluster_algo: str = "kmeans"
    category_prefix: str = "auto_category"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    # turns token ids into text for a sentence-transformers model, or text into token ids for
    # the hidden-state embeddings
    tokenizer: Any = None
    # a causal LM whose mean-pooled hidden states embed the rows when no sentence-transformers
    # model is available locally (the plugin passes the model being trained)
    model: Any = None
    seed: int = 42
    max_length: int = 512

    @classmethod
    def from_value(cls, value: AutoCategorizeConfig | Mapping[str, Any] | None) -> Any:
        """A config from itself, a mapping of its fields (unknown keys are an error) or None."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ODMConfigError(
                f"auto_categorize_config: expected a mapping or AutoCategorizeConfig, got "
                f"{type(value).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in names:
                raise ODMConfigError(
                    f"auto_categorize_config: unknown key {key!r}{suggestion(str(key), names)}; "
                    f"allowed: {', '.join(names)}"
                )
        config = cls(**value)
        if config.num_categories is not None and (
            not isinstance(config.num_categories, int) or config.num_categories < 1
        ):
            raise ODMConfigError(
                f"auto_categorize_config['num_categories']: {config.num_categories!r} must be "
                "a positive integer"
            )
        if config.cluster_algo.lower() != "kmeans":
            raise ODMConfigError(
                f"auto_categorize_config['cluster_algo']: {config.cluster_algo!r} is not "
                "supported; allowed: kmeans"
            )
        return config


def category_count(config: AutoCategorizeConfig, rows: int) -> int:
    """num_categories if given, else sqrt(rows) within [min, max]; never more than rows."""
    if config.num_categories is not None:
        desired = config.num_categories
    else:
        desired = int(math.sqrt(max(rows, 1)))
        desired = min(max(desired, config.min_categories), config.max_categories)
    return max(1, min(rows, desired))


def require_sized(dataset: Any, key: str) -> int:
    """len(dataset), or an error naming `key` for an iterable (streaming) dataset."""
    length = sized_length(dataset)
    if length is None:
        raise UnsupportedDatasetError(
            f"{key}: {type(dataset).__name__} is an iterable (streaming) dataset; "
            "auto-categorisation of iterable datasets is not yet supported: it clusters all rows "
            "at once, so pass a sized dataset (a datasets.Dataset, a list, a map-style torch "
            "Dataset) or split the data into named categories yourself"
        )
    if length == 0:
        raise ODMConfigError(f"{key}: cannot auto-categorise an empty dataset (0 rows)")
    return length


def column(dataset: Any, name: str, key: str) -> list[Any]:
    """The values of column `name` of every row, or an error naming the config key."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if name not in names:
            raise ODMConfigError(
                f"auto_categorize_config['input_column']: {key} has no column {name!r}"
                f"{suggestion(name, list(names))}; its columns: {', '.join(names)}"
            )
        return list(dataset[name])
    values = []
    for index in range(len(dataset)):
        row = dataset[index]
        if not isinstance(row, Mapping) or name not in row:
            raise ODMConfigError(
                f"auto_categorize_config['input_column']: row {index} of {key} has no {name!r}"
            )
        values.append(row[name])
    return values


def subset(dataset: Any, indices: list[int]) -> Any:
    """The rows at `indices`, of the same kind where the dataset can select."""
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    if isinstance(dataset, list):
        return [dataset[i] for i in indices]
    return torch.utils.data.Subset(dataset, indices)


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(x) for x in value.reshape(-1).tolist()]
    return [int(x) for x in value]


def hidden_state_embeddings(
    model: Any, sequences: Sequence[list[int]], batch_size: int, pad_id: int = 0
) -> np.ndarray:
    """Mean over each sequence's tokens of the model's last hidden states, L2-normalised."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    vectors = []
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                out = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                )
                hidden = out.hidden_states[-1].float()
                weights = mask.to(hidden.device, hidden.dtype)[..., None]
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
                vectors.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(vectors).numpy()


class DatasetAutoCategorizer:
    """Clusters a dataset into pseudo categories; `assign` puts more rows into the same ones."""

    def __init__(self, config: AutoCategorizeConfig | None = None) -> None:
        self.config = dataclasses.replace(config) if config else AutoCategorizeConfig()
        self.kmeans: Any = None
        self._sentence_model: Any = None
        self._sentence_model_tried = False

    # --- embeddings ---------------------------------------------------------------------------

    def sentence_model(self) -> Any:
        """The sentence-transformers model if it loads from local files, else None."""
        if self._sentence_model_tried:
            return self._sentence_model
        self._sentence_model_tried = True
        loader = SentenceTransformer
        if loader is None or not self.config.model_name:
            return None
        try:
            self._sentence_model = loader(
                self.config.model_name,
                model_kwargs=self.config.model_kwargs,
                prompts=_PROMPT,
                default_prompt_name="clustering",
                local_files_only=True,
            )
        except Exception as err:  # any failure to load offline means: use the hidden states
            logger.warning(
                "auto-categorisation: sentence-transformers model %r is not available locally "
                "(%s: %s); embedding with the hidden states of the model being trained",
                self.config.model_name,
                type(err).__name__,
                err,
            )
            self._sentence_model = None
        return self._sentence_model

    def can_embed(self) -> bool:
        """Whether embeddings can be computed now (a local sentence model, or `config.model`)."""
        return self.sentence_model() is not None or self.config.model is not None

    def embed(self, dataset: Any, key: str) -> np.ndarray:
        """One L2-normalised vector per row of `dataset`."""
        values = column(dataset, self.config.input_column, key)
        is_text = isinstance(values[0], str)
        tokenizer = self.config.tokenizer
        sentence_model = self.sentence_model()
        if sentence_model is not None:
            if not is_text:
                if tokenizer is None:
                    raise AutoCategorizeInputError(
                        f"auto_categorize_config['tokenizer']: column "
                        f"{self.config.input_column!r} of {key} holds token ids, and the "
                        f"sentence-transformers model {self.config.model_name!r} needs text: "
                        "give the tokenizer that made them"
                    )
                values = tokenizer.batch_decode([_as_ids(v) for v in values])
            return np.asarray(
                sentence_model.encode(
                    values,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                    batch_size=self.config.batch_size,
                    normalize_embeddings=True,
                ),
                dtype=np.float32,
            )
        model = self.config.model
        if model is None:
            raise ODMConfigError(
                f"auto_categorize_config: no embedding model for {key}: sentence-transformers "
                f"model {self.config.model_name!r} is not available locally and no 'model' was "
                "given (the ODM plugin passes the model being trained at the start of training)"
            )
        if is_text:
            if tokenizer is None:
                raise AutoCategorizeInputError(
                    f"auto_categorize_config['tokenizer']: column {self.config.input_column!r} "
                    f"of {key} holds text; the hidden-state embeddings need the tokenizer of "
                    "the model to turn it into token ids"
                )
            sequences = [
                _as_ids(
                    tokenizer(v, truncation=True, max_length=self.config.max_length)["input_ids"]
                )
                for v in values
            ]
        else:
            sequences = [_as_ids(v)[: self.config.max_length] for v in values]
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        return hidden_state_embeddings(model, sequences, self.config.batch_size, pad or 0)

    # --- clustering ---------------------------------------------------------------------------

    def fit(
        self, dataset: Any, key: str = "dataset_dict", share: Callable[[Any], Any] | None = None
    ) -> dict[str, Any]:
        """Cluster `dataset` into named categories; `share(labels)` may replace the labels
        (e.g. with rank 0's, so that every process agrees)."""
        from sklearn.cluster import KMeans

        rows = require_sized(dataset, key)
        clusters = category_count(self.config, rows)
        embeddings = self.embed(dataset, key)
        kwargs = {"n_init": 10, "random_state": self.config.seed, **self.config.cluster_kwargs}
        self.kmeans = KMeans(n_clusters=clusters, **kwargs)
        labels = self.kmeans.fit_predict(embeddings)
        if share is not None:
            labels = share(labels)
        logger.info("auto-categorised %d rows of %s into %d clusters", rows, key, clusters)
        return self._group(dataset, labels, range(clusters))

    def assign(
        self, dataset: Any, key: str, share: Callable[[Any], Any] | None = None
    ) -> dict[str, Any]:
        """Put the rows of `dataset` into the clusters `fit` found (empty ones are left out)."""
        if self.kmeans is None:
            raise ODMConfigError(f"{key}: assign() needs fit() on the training rows first")
        require_sized(dataset, key)
        labels = self.kmeans.predict(self.embed(dataset, key))
        if share is not None:
            labels = share(labels)
        return self._group(dataset, labels, range(self.kmeans.n_clusters))

    def __call__(self, dataset: Any) -> dict[str, Any]:
        """The reference's call: fit and split."""
        return self.fit(dataset)

    def _group(self, dataset: Any, labels: Any, clusters: range) -> dict[str, Any]:
        grouped: dict[int, list[int]] = {}
        for index, label in enumerate(np.asarray(labels).tolist()):
            grouped.setdefault(int(label), []).append(index)
        return {
            f"{self.config.category_prefix}_{label}": subset(dataset, grouped[label])
            for label in clusters
            if label in grouped
        }
