# CLOVER Studio: the web app, with the offline models (Whisper tiny.en / base, SmolLM2-135M) installed.
#   docker build -t clover-studio . && docker run -p 7860:7860 clover-studio     # http://localhost:7860
FROM python:3.11-slim
# ffmpeg: browser recordings (webm/ogg) are converted for the speech models; libsndfile: WAV/FLAC reading.
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 clover
WORKDIR /home/clover/app

# The CPU build of torch first, so the range in requirements.txt is already met and no CUDA build is
# pulled in; for a GPU image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt requirements-offline.txt constraints.txt ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4,<3" \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-offline.txt

# Only what the app runs on (no .venv, .git or tests in the image).
COPY --chown=clover:clover app.py pyproject.toml README.md ./
COPY --chown=clover:clover clover_core ./clover_core
COPY --chown=clover:clover studio ./studio
COPY --chown=clover:clover assets ./assets
USER clover
ENV HOME=/home/clover \
    HF_HOME=/home/clover/.cache/huggingface \
    CLOVER_CACHE=/home/clover/.cache/clover_studio \
    GRADIO_ANALYTICS_ENABLED=False \
    PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
# The default model ships as GGUF; convert it once now, so the first page load does not wait for it.
RUN python -c "from clover_core.models import load_model; load_model('smollm2-135m')"
EXPOSE 7860
CMD ["python", "app.py"]
