// CRUD through the official Node.js driver; prints one JSON summary on stdout.
//
// Usage: node crud.js <mongodb-uri> <database>   (or MONGO_URI / MONGO_DB in the env)
// Exits non-zero (with the error on stderr) if any operation throws.
'use strict';

const { MongoClient } = require('mongodb');

async function main() {
  const uri = process.argv[2] || process.env.MONGO_URI;
  const dbName = process.argv[3] || process.env.MONGO_DB;
  if (!uri || !dbName) {
    throw new Error('usage: node crud.js <mongodb-uri> <database>');
  }
  const client = new MongoClient(uri, {
    serverSelectionTimeoutMS: 10000,
    connectTimeoutMS: 10000,
    appName: 'mongoproxy-node-crud',
  });
  const out = {};
  try {
    await client.connect();
    const db = client.db(dbName);
    const hello = await db.admin().command({ hello: 1 });
    out.hello = {
      msg: hello.msg,
      maxWireVersion: hello.maxWireVersion,
      connectionId: hello.connectionId,
    };

    const coll = db.collection('items');
    const one = await coll.insertOne({ _id: 'first', kind: 'one', n: 0 });
    out.insertOne = { acknowledged: one.acknowledged, insertedId: one.insertedId };

    const docs = [];
    for (let i = 1; i <= 120; i++) {
      docs.push({ _id: i, kind: i % 2 === 0 ? 'even' : 'odd', n: i, grp: i % 4 });
    }
    const many = await coll.insertMany(docs);
    out.insertMany = { insertedCount: many.insertedCount };

    // batchSize 10 makes the driver issue getMore several times.
    const found = await coll.find({ kind: 'even' }).sort({ n: 1 }).batchSize(10).toArray();
    out.find = { count: found.length, firstN: found[0].n, lastN: found[found.length - 1].n };
    out.findOne = await coll.findOne({ _id: 7 });

    const upd = await coll.updateOne({ _id: 'first' }, { $set: { n: 42 }, $inc: { bumps: 1 } });
    out.updateOne = { matchedCount: upd.matchedCount, modifiedCount: upd.modifiedCount };
    const updMany = await coll.updateMany({ grp: 0 }, { $set: { flagged: true } });
    out.updateMany = { matchedCount: updMany.matchedCount, modifiedCount: updMany.modifiedCount };

    const del = await coll.deleteOne({ _id: 1 });
    out.deleteOne = { deletedCount: del.deletedCount };

    out.aggregate = await coll
      .aggregate([
        { $match: { n: { $gte: 1 } } },
        // (FerretDB 1.24 returns 0 for a constant {$sum: 1} next to a {$sum: '$field'}
        // in the same $group, so the document count is a separate pipeline.)
        { $group: { _id: '$kind', total: { $sum: '$n' } } },
        { $sort: { _id: 1 } },
      ])
      .toArray();
    out.aggregateCount = await coll
      .aggregate([{ $match: { grp: 1 } }, { $group: { _id: '$kind', docs: { $sum: 1 } } }])
      .toArray();

    out.countDocuments = {
      all: await coll.countDocuments({}),
      flagged: await coll.countDocuments({ flagged: true }),
    };

    try {
      await coll.insertOne({ _id: 2 });
      out.duplicate = null;
    } catch (err) {
      out.duplicate = { code: err.code, name: err.name };
    }
  } finally {
    await client.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`crud.js failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
