"""Serving the production model over KServe's Open Inference Protocol v2 (REST).

    ctbot serve-model --store s3://bucket/ --model mnist-arcface --port 8080

model.py loads a published package (torch.export program, faiss index, labels) and
predicts; protocol.py turns v2 JSON into arrays and back; follow.py watches the
production alias and swaps models atomically; server.py is the HTTP front;
client.py reads what a server serves. torch and faiss are imported only by model.py.
"""
