"""Lines of text in images: RapidOCR's PP-OCR detector, angle classifier and recognizer, run for a whole micro-batch.

The models, their settings (config.yaml) and the pieces of RapidOCR that are right as they are (the DB
post-processing of the detector, the CTC decoding, the image size rules) come from the
`rapidocr-onnxruntime` wheel; this module only orchestrates them differently, and must read the same text
as RapidOCR's own `RapidOCR()(image)` called once per image:

- the detector runs per image, at the input size RapidOCR chooses (its output decides every crop);
- the angle classifier and the recognizer run on the crops of every image of the call together, each
  crop padded to the width RapidOCR would pad it to (`_rec_widths`), crops of one width in one batch;
- inputs are normalized through 256-entry tables holding exactly the float32 values RapidOCR's
  arithmetic produces, reading the RGB pixels in the BGR order the models were trained on, so no colour
  conversion or float64 pass over the image is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ModelError
from policies.outputs import TextLine

if TYPE_CHECKING:
    import onnxruntime
    from PIL import Image

REC_BATCH = 32
"""Crops of one padded width per recognizer call (a crop's result does not depend on its batch companions)."""
CLS_BATCH = 32
"""Crops per angle-classifier call (its input is always 48x192, so batching never changes a crop's input)."""


class TextReader:
    """Lines of text in images, with RapidOCR's PP-OCR models (shipped in the rapidocr-onnxruntime wheel)."""

    def __init__(self, package_dir: Path, config: dict[str, Any], threads: int) -> None:
        from rapidocr_onnxruntime.ch_ppocr_cls.utils import ClsPostProcess
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
        from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

        self._global = config["Global"]
        det, cls, rec = config["Det"], config["Cls"], config["Rec"]
        self._det_config = det
        self._cls_config = cls
        self._rec_config = rec
        self._model_files = [Path(part["model_path"]).name for part in (det, cls, rec)]
        self._det = _session(package_dir / det["model_path"], threads)
        self._cls = _session(package_dir / cls["model_path"], threads)
        self._rec = _session(package_dir / rec["model_path"], threads)
        self._db = DBPostProcess(
            thresh=det["thresh"],
            box_thresh=det["box_thresh"],
            max_candidates=det["max_candidates"],
            unclip_ratio=det["unclip_ratio"],
            use_dilation=det["use_dilation"],
            score_mode=det["score_mode"],
        )
        self._cls_decode = ClsPostProcess(cls["label_list"])
        characters = self._rec.get_modelmeta().custom_metadata_map["character"].splitlines()
        self._ctc = CTCLabelDecode(character=characters)
        self._det_table = _det_table(det["mean"], det["std"])
        self._unit_table = _unit_table()
        self.threads = threads

    @classmethod
    def from_wheel(cls, *, threads: int = 1) -> TextReader:
        """The reader on the models and settings inside the installed rapidocr-onnxruntime wheel.

        ModelError `ocr_unavailable` when the package or its model files are missing.
        """
        try:
            import onnxruntime  # noqa: F401
            import rapidocr_onnxruntime
            import yaml
        except ImportError as exc:
            raise ModelError(
                f"text reading needs the rapidocr-onnxruntime package ({exc.name} is missing): "
                "install the worker extra (pip install 'modtag[worker]')",
                code="ocr_unavailable",
            ) from exc
        package_dir = Path(rapidocr_onnxruntime.__file__).resolve().parent
        config_path = package_dir / "config.yaml"
        try:
            config = yaml.safe_load(config_path.read_text())
            missing = [
                str(package_dir / config[part]["model_path"])
                for part in ("Det", "Cls", "Rec")
                if not (package_dir / config[part]["model_path"]).is_file()
            ]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
            raise ModelError(
                f"the rapidocr-onnxruntime package has no readable {config_path} ({exc}): reinstall it "
                "(pip install --force-reinstall 'rapidocr-onnxruntime>=1.4,<2')",
                code="ocr_unavailable",
            ) from exc
        if missing:
            raise ModelError(
                f"the rapidocr-onnxruntime package lacks its model files ({', '.join(missing)}): reinstall it "
                "(pip install --force-reinstall 'rapidocr-onnxruntime>=1.4,<2')",
                code="ocr_unavailable",
            )
        return cls(package_dir, config, max(1, threads))

    def read(self, images: Sequence[Image.Image]) -> list[tuple[TextLine, ...]]:
        """One tuple per image: its lines of text in reading order (top to bottom, left to right)."""
        pages = [self._detect(image) for image in images]
        crops = [crop for page in pages for crop in page.crops]
        crops = self._upright(crops)
        texts = self._recognize(pages, crops)
        result: list[tuple[TextLine, ...]] = []
        at = 0
        for page in pages:
            lines = []
            for box in page.boxes:
                text, score = texts[at]
                at += 1
                if score >= self._global["text_score"] and text:
                    lines.append(TextLine(text, score, box))
            result.append(tuple(lines))
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "source": f"rapidocr-onnxruntime {_version()} (PP-OCR {', '.join(self._model_files)})",
            "random": False,
            "device": "cpu",
            "dtype": "float32",
        }

    # Detection: per image, at RapidOCR's sizes.

    def _detect(self, image: Image.Image) -> _Page:
        import cv2
        from rapidocr_onnxruntime import RapidOCR
        from rapidocr_onnxruntime.utils import add_round_letterbox

        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        raw_h, raw_w = pixels.shape[:2]
        # RapidOCR's own size rules, in its order: longest side at most max_side_len, shortest at least
        # min_side_len (each a resize to multiples of 32), then a black band above and below short or
        # very wide images.
        longest, shortest = self._global["max_side_len"], self._global["min_side_len"]
        if max(raw_h, raw_w) > longest:
            pixels = _rescaled(pixels, longest / max(raw_h, raw_w))
        if min(pixels.shape[:2]) < shortest:
            pixels = _rescaled(pixels, shortest / min(pixels.shape[:2]))
        ratio_h, ratio_w = raw_h / pixels.shape[0], raw_w / pixels.shape[1]
        h, w = pixels.shape[:2]
        pad = 0
        wide = self._global["width_height_ratio"] != -1 and w / h > self._global["width_height_ratio"]
        if h <= self._global["min_height"] or wide:
            new_h = max(int(w / self._global["width_height_ratio"]), self._global["min_height"]) * 2
            pad = int(abs(new_h - h) / 2)
            pixels = add_round_letterbox(pixels, (pad, pad, 0, 0))
            h, w = pixels.shape[:2]

        size = _det_size(h, w, self._det_config["limit_side_len"], self._det_config["limit_type"])
        scaled = np.asarray(cv2.resize(pixels, size), dtype=np.uint8)
        batch = np.empty((1, 3, *scaled.shape[:2]), dtype=np.float32)
        for channel in range(3):  # BGR: the channel order the models were trained on
            np.take(self._det_table, scaled[:, :, 2 - channel], out=batch[0, channel])
        probabilities = self._det.run(None, {self._det.get_inputs()[0].name: batch})[0]
        quads, _ = self._db(probabilities, (h, w))
        quads = _kept_quads(quads, h, w)
        if not quads:
            return _Page((), ())
        quads = RapidOCR.sorted_boxes(np.array(quads))

        crops = tuple(_crop(pixels, quad) for quad in quads)
        boxes = tuple(_original_box(quad, pad, ratio_w, ratio_h, raw_w, raw_h) for quad in quads)
        return _Page(crops, boxes)

    # Angle classification: crops read upside down turn 180 degrees, as RapidOCR turns them.

    def _upright(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        import cv2

        if not crops:
            return crops
        _, height, width = self._cls_config["cls_image_shape"]
        order = np.argsort(np.array([crop.shape[1] / float(crop.shape[0]) for crop in crops]))
        result = list(crops)
        name = self._cls.get_inputs()[0].name
        for start in range(0, len(order), CLS_BATCH):
            chosen = order[start : start + CLS_BATCH]
            batch = np.zeros((len(chosen), 3, height, width), dtype=np.float32)
            for row, index in enumerate(chosen):
                self._fill(batch[row], crops[index], height, width)
            for index, (label, score) in zip(
                chosen, self._cls_decode(self._cls.run(None, {name: batch})[0]), strict=True
            ):
                if "180" in label and score > self._cls_config["cls_thresh"]:
                    result[index] = cv2.rotate(crops[index], cv2.ROTATE_180)
        return result

    # Recognition: every crop of the call, sorted by width, in batches padded as RapidOCR pads.

    def _recognize(self, pages: Sequence[_Page], crops: list[np.ndarray]) -> list[tuple[str, float]]:
        if not crops:
            return []
        _, height, _ = self._rec_config["rec_img_shape"]
        widths = self._rec_widths(pages, crops)
        texts: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        name = self._rec.get_inputs()[0].name
        for width in sorted(set(widths)):
            same = [index for index, padded in enumerate(widths) if padded == width]
            for start in range(0, len(same), REC_BATCH):
                chosen = same[start : start + REC_BATCH]
                batch = np.zeros((len(chosen), 3, height, width), dtype=np.float32)
                for row, index in enumerate(chosen):
                    self._fill(batch[row], crops[index], height, width)
                decoded = self._ctc(self._rec.run(None, {name: batch})[0])
                for index, (text, score) in zip(chosen, decoded, strict=True):
                    texts[index] = (text, float(score))
        return texts

    def _rec_widths(self, pages: Sequence[_Page], crops: list[np.ndarray]) -> list[int]:
        """Each crop's padded width: the one RapidOCR gives it, reading its image alone.

        The recognizer attends across the whole padded line, so the padding changes what it reads (a space
        more or less); a crop's row is the same whatever the batch size. RapidOCR sorts an image's crops by
        aspect ratio and pads each batch of `rec_batch_num` to its widest (at least the 320 px of
        rec_img_shape): that width, recomputed here, lets crops of every image that share it run together.
        """
        _, height, min_width = self._rec_config["rec_img_shape"]
        per_call = self._rec_config["rec_batch_num"]
        widths = [0] * len(crops)
        first = 0
        for page in pages:
            count = len(page.crops)
            ratios = np.array([crop.shape[1] / float(crop.shape[0]) for crop in crops[first : first + count]])
            order = np.argsort(ratios)
            for start in range(0, count, per_call):
                chosen = order[start : start + per_call]
                widest = max(min_width / height, *(float(ratios[i]) for i in chosen))
                for i in chosen:
                    widths[first + int(i)] = int(height * widest)
            first += count
        return widths

    def _fill(self, row: np.ndarray, crop: np.ndarray, height: int, width: int) -> None:
        """One crop into a zero-padded (3, height, width) row: resized to `height`, at most `width` wide."""
        import cv2

        resized_w = min(width, math.ceil(height * crop.shape[1] / float(crop.shape[0])))
        resized = np.asarray(cv2.resize(crop, (resized_w, height)), dtype=np.uint8)
        for channel in range(3):
            np.take(self._unit_table, resized[:, :, 2 - channel], out=row[channel, :, :resized_w])


@dataclass(frozen=True)
class _Page:
    crops: tuple[np.ndarray, ...]
    boxes: tuple[tuple[int, int, int, int], ...]  # in the original image's pixels


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Without spinning, ORT's threads sleep once a call returns instead of holding the cores torch needs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # ORT's CPU arena keeps the most memory a call ever needed (a large photo's detector pass, or the recognizer over
    # a burst's lines) for the life of the session, and memory patterns plan buffers per input shape, which differs
    # from image to image anyway. Without both, a worker's memory goes back down after a burst of large images.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _det_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Each byte's detector input, computed as RapidOCR computes it (float32 scale, float64 mean and std)."""
    levels = np.arange(256, dtype=np.float32)[:, None]
    values = (levels * (1 / 255.0) - np.array(mean)) / np.array(std)
    if not np.allclose(values, values[:, :1]):
        raise ModelError(
            "the OCR detector's mean and std differ by channel; this reader assumes one", code="ocr_unavailable"
        )
    return values[:, 0].astype(np.float32)


def _unit_table() -> np.ndarray:
    """Each byte's classifier and recognizer input: float32 (x / 255 - 0.5) / 0.5, in RapidOCR's order of operations."""
    values = np.arange(256, dtype=np.float32) / 255
    values -= 0.5
    values /= 0.5
    return values


def _rescaled(pixels: np.ndarray, ratio: float) -> np.ndarray:
    """RapidOCR's resize of a too large or too small image: by `ratio`, each side rounded to a multiple of 32.

    A side that would round to 0 (RapidOCR fails there) becomes 32.
    """
    import cv2

    h, w = pixels.shape[:2]
    size = (max(32, int(round(int(w * ratio) / 32) * 32)), max(32, int(round(int(h * ratio) / 32) * 32)))
    return cv2.resize(pixels, size)


def _det_size(h: int, w: int, limit: int, limit_type: str) -> tuple[int, int]:
    """The detector's input (width, height): RapidOCR's rule, scaled to `limit` then rounded to multiples of 32."""
    if limit_type == "max":
        ratio = float(limit) / max(h, w) if max(h, w) > limit else 1.0
    else:
        ratio = float(limit) / min(h, w) if min(h, w) < limit else 1.0
    return int(round(int(w * ratio) / 32) * 32), int(round(int(h * ratio) / 32) * 32)


def _kept_quads(quads: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """The detected quadrilaterals ordered clockwise from the top-left, clipped to the image, the tiny ones dropped."""
    kept = []
    for quad in quads:
        by_x = quad[np.argsort(quad[:, 0]), :]
        left = by_x[:2][np.argsort(by_x[:2, 1]), :]
        right = by_x[2:][np.argsort(by_x[2:, 1]), :]
        ordered = np.array([left[0], right[0], right[1], left[1]], dtype=np.float32)
        ordered[:, 0] = np.floor(np.clip(ordered[:, 0], 0, w - 1))
        ordered[:, 1] = np.floor(np.clip(ordered[:, 1], 0, h - 1))
        if int(np.linalg.norm(ordered[0] - ordered[1])) <= 3 or int(np.linalg.norm(ordered[0] - ordered[3])) <= 3:
            continue
        kept.append(ordered)
    return kept


def _crop(pixels: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The quadrilateral warped to an upright rectangle (bicubic, edges replicated); tall ones turned to lie flat."""
    import cv2

    width = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    transform = cv2.getPerspectiveTransform(quad, target)
    crop = cv2.warpPerspective(
        pixels, transform, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if crop.shape[0] / crop.shape[1] >= 1.5:
        crop = np.rot90(crop)
    return crop


def _original_box(
    quad: np.ndarray, pad: int, ratio_w: float, ratio_h: float, raw_w: int, raw_h: int
) -> tuple[int, int, int, int]:
    """The quadrilateral's bounds in the original image: x0, y0 inclusive, x1, y1 exclusive, inside the image."""
    xs = np.clip(quad[:, 0] * ratio_w, 0, raw_w)
    ys = np.clip((quad[:, 1] - pad) * ratio_h, 0, raw_h)
    x0 = min(math.floor(xs.min()), raw_w - 1)
    y0 = min(math.floor(ys.min()), raw_h - 1)
    x1 = max(x0 + 1, min(raw_w, math.floor(xs.max()) + 1))
    y1 = max(y0 + 1, min(raw_h, math.floor(ys.max()) + 1))
    return x0, y0, x1, y1


def _version() -> str:
    try:
        return metadata.version("rapidocr-onnxruntime")
    except metadata.PackageNotFoundError:
        return "unknown"
