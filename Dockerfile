# CLOVER Studio: a runnable image with the offline models included.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 clover
WORKDIR /home/clover/app
COPY requirements.txt requirements-offline.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-offline.txt
COPY --chown=clover:clover . .
USER clover
ENV HF_HOME=/home/clover/.cache/huggingface PYTHONUNBUFFERED=1
EXPOSE 7860
CMD ["python", "-m", "clover_core", "demo"]
